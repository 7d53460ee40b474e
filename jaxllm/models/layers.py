"""The GPT's building blocks (jaxllm/models/gpt.py puts them together): parameter
initialisers with logical axes, norms, the Einsum/Dense layers (bf16 twins under
`matmul_dtype=bfloat16`), rotary embeddings, attention and the MLP.

Shapes are in the names: B batch, L sequence, S cache length, D d_model, H heads, G kv heads,
K head dim, F MLP hidden, N tokens (B * L).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.models import matmul


def _init(std: float, axes: tuple[str | None, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), axes)


def _zeros(axes: tuple[str | None, ...]):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def _ones(axes: tuple[str | None, ...]):
  return nn.with_logical_partitioning(nn.initializers.ones_init(), axes)


def _output_init(cfg: ModelConfig, std: float, axes: tuple[str | None, ...]):
  """A kernel writing into the residual stream (or the logits): normal(std), or zeros under
  `zero_init_proj` (the speedrun's: each block starts as the identity, the head at 0)."""
  return _zeros(axes) if cfg.zero_init_proj else _init(std, axes)


def scalar(module: nn.Module, name: str, value: float) -> jax.Array:
  """A learned scalar parameter starting at `value` (replicated; "layers" when scanned)."""
  init = nn.with_logical_partitioning(nn.initializers.constant(value), ())
  return module.param(name, init, ())


def _norm(cfg: ModelConfig, name: str | None = None, axes=("embed",)) -> nn.Module:
  if cfg.norm == "rmsnorm":  # no bias, no mean; statistics in float32
    return nn.RMSNorm(epsilon=cfg.layer_norm_epsilon, dtype=cfg.dtype,
                      scale_init=_ones(axes), name=name)
  return nn.LayerNorm(
      epsilon=cfg.layer_norm_epsilon, use_bias=cfg.bias, dtype=cfg.dtype,
      scale_init=_ones(axes), bias_init=_zeros(axes), name=name)


def _einsum(cfg: ModelConfig, *args, **kwargs) -> nn.Module:
  """nn.Einsum, or its bf16-operand twin when `matmul_dtype` is bfloat16 (same parameters)."""
  cls = matmul.Bf16Einsum if cfg.matmul_dtype == "bfloat16" else nn.Einsum
  return cls(*args, dtype=cfg.dtype, **kwargs)


def _dense(cfg: ModelConfig, *args, **kwargs) -> nn.Module:
  if cfg.matmul_dtype == "bfloat16":
    kwargs["dot_general"] = matmul.dot_general
  return nn.Dense(*args, dtype=cfg.dtype, **kwargs)


def rope_frequencies(cfg: ModelConfig) -> np.ndarray:
  """The rotary angle per position of each pair of head dims, K/2 (Llama 3's scaling: low
  frequencies slowed down by `factor`, high ones kept, a smooth blend in between)."""
  k = cfg.head_dim
  inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, k, 2, dtype=np.float64) / k)
  if cfg.rope_scaling_factor:
    factor, low, high = cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    old = cfg.rope_original_context
    wavelength = 2 * np.pi / inv_freq
    smooth = (old / wavelength - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    inv_freq = np.where(wavelength > old / low, inv_freq / factor,
                        np.where(wavelength < old / high, inv_freq, blended))
  return inv_freq.astype(np.float32)


def attention(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, mask=None, is_causal: bool = False):
  """`jax.nn.dot_product_attention` (G kv heads serving H / G query heads each; `mask`
  broadcasting to BxHxLxS): its XLA form takes the softmax in float32, so float64 inputs
  (model.dtype=float64) get the same attention written out in float64."""
  if q_BxLxHxK.dtype != jnp.float64:
    return jax.nn.dot_product_attention(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, mask=mask,
                                        is_causal=is_causal)
  groups = q_BxLxHxK.shape[2] // k_BxSxGxK.shape[2]
  k_BxSxHxK, v_BxSxHxK = (jnp.repeat(x, groups, axis=2) for x in (k_BxSxGxK, v_BxSxGxK))
  scores_BxHxLxS = (jnp.einsum("blhk,bshk->bhls", q_BxLxHxK, k_BxSxHxK)
                    / math.sqrt(q_BxLxHxK.shape[-1]))
  if is_causal:
    mask = jnp.tril(jnp.ones(scores_BxHxLxS.shape[-2:], bool))
  if mask is not None:
    scores_BxHxLxS = jnp.where(mask, scores_BxHxLxS, jnp.finfo(scores_BxHxLxS.dtype).min)
  return jnp.einsum("bhls,bshk->blhk", jax.nn.softmax(scores_BxHxLxS, axis=-1), v_BxSxHxK)


def apply_rope(x_BxLxHxK, positions_BxL, inv_freq_K2):
  """Rotates each (i, i + K/2) pair of dims by position * frequency (Llama's rotate-half)."""
  dtype = jnp.promote_types(x_BxLxHxK.dtype, jnp.float32)  # float32, or float64
  angles_BxLx1xK2 = positions_BxL[:, :, None, None].astype(dtype) * inv_freq_K2.astype(dtype)
  cos, sin = jnp.cos(angles_BxLx1xK2), jnp.sin(angles_BxLx1xK2)
  x1, x2 = jnp.split(x_BxLxHxK.astype(dtype), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x_BxLxHxK.dtype)

class MLP(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg = self.config
    residual_std = 0.02 / math.sqrt(2 * cfg.n_layer)
    # Tokens as rows of a matrix: on XLA:CPU the 3-D form makes the backward pass re-compute
    # the GELU derivative inside a transposing copy, 3x slower than the matmuls themselves.
    x_NxD = x_BxLxD.reshape(-1, cfg.d_model)

    def dense(width, axes, std, name, init=_init):
      return _dense(cfg, width, use_bias=cfg.bias, kernel_init=init(std, axes),
                    bias_init=_zeros(axes[-1:]), name=name)

    if cfg.mlp == "swiglu":  # down(silu(gate(x)) * up(x))
      gate_NxF = dense(cfg.hidden, ("embed", "mlp"), 0.02, "gate")(x_NxD)
      up_NxF = dense(cfg.hidden, ("embed", "mlp"), 0.02, "up")(x_NxD)
      h_NxF = nn.silu(nn.with_logical_constraint(gate_NxF, ("batch", "mlp"))) * up_NxF
    elif cfg.mlp == "relu2":  # proj(relu(fc(x))^2): Primer's, the speedrun's
      h_NxF = dense(cfg.hidden, ("embed", "mlp"), 0.02, "fc")(x_NxD)
      h_NxF = jnp.square(nn.relu(nn.with_logical_constraint(h_NxF, ("batch", "mlp"))))
    else:
      h_NxF = dense(cfg.hidden, ("embed", "mlp"), 0.02, "fc")(x_NxD)
      # N = B * L rows: split as the batch is (whole rows of B stay together).
      h_NxF = nn.with_logical_constraint(h_NxF, ("batch", "mlp"))
      # GPT-2's tanh approximation, recomputed in the backward pass from its input: else XLA
      # keeps one more NxF intermediate per layer for the derivative (0.15 GB of temporaries
      # at GPT-2 small's B4 x T256); the same arithmetic, the same losses.
      h_NxF = jax.checkpoint(functools.partial(nn.gelu, approximate=True))(h_NxF)
    out_NxD = dense(cfg.d_model, ("mlp", "embed"), residual_std, "proj",
                    functools.partial(_output_init, cfg))(h_NxF)
    return out_NxD.reshape(x_BxLxD.shape)
