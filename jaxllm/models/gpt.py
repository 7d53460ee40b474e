"""A GPT-2-family transformer in Flax Linen, read top to bottom, with Llama's components as
options.

GPT-2 (the defaults): token + learned position embeddings, pre-LayerNorm blocks of causal
multi-head attention and a GELU MLP, a final LayerNorm and an output projection tied to the
token embedding (or not). Llama-family models switch, by config: RMSNorm (`norm`), rotary
position embeddings with Llama 3's frequency scaling (`position`, `rope_*`), a SwiGLU MLP
with its own width (`mlp`, `mlp_hidden`), grouped-query attention with fewer key/value heads
(`n_kv_head`; the KV cache holds only those), biases per kind of layer (`bias`, `qkv_bias`)
and Qwen3's QK-norm (`qk_norm`). The GPT-2 speedrun's keys, each off by default: a ReLU²
MLP (`mlp=relu2`), zero-initialised output projections and head (`zero_init_proj`), soft-capped
logits (`logit_softcap`), an x0 shortcut into every block (`x0_shortcut`) and a value residual
from the first layer's values (`value_residual`), their learned per-layer scalars replicated
("layers" when scanned). The pieces (norms, attention, RoPE, the MLP) are in
jaxllm/models/layers.py. Parameters are float32 whatever the compute dtype;
`matmul_dtype=bfloat16` sends every weight matmul through jaxllm/models/matmul.py (bf16 operands,
float32 products, the same parameters). Every parameter names its logical axes ("vocab",
"embed", "heads", "kv_heads", "mlp", ...) and a few activations name theirs ("batch",
"sequence", ...), so sharding is a table of rules (jaxllm/training/sharding.py), not model code;
outside an `nn.logical_axis_rules` context the activation constraints do nothing.

Two options change how the blocks run, not what they compute: `remat` recomputes each block's
activations in the backward pass, and `scan_layers` stacks the blocks' parameters (one "blocks"
entry with a leading "layers" axis instead of blocks_0, blocks_1, ...) under one `nn.scan`.

Shapes are in the names: B batch, L sequence, S cache length, D d_model, H heads, G kv heads,
K head dim, F MLP hidden, V vocabulary.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig
from jaxllm.models import matmul
from jaxllm.models.layers import (
  MLP,
  _dense,
  _einsum,
  _init,
  _norm,
  _output_init,
  _zeros,
  apply_rope,
  attention,
  rope_frequencies,
  scalar,
)

# A KV cache: one {"k": BxSxGxK, "v": BxSxGxK} dict per layer.
KVCache = list[dict[str, jax.Array]] | dict[str, jax.Array]  # per layer, or stacked

# model.remat -> what a block keeps for the backward pass (None: only its inputs).
REMAT_POLICIES = {
    "full": None,
    # The outputs of the matmuls with the weights (no batch dimensions); attention scores,
    # GELU and LayerNorm are recomputed.
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class CausalSelfAttention(nn.Module):
  config: ModelConfig

  def _projections(self, x_BxLxD):
    """q (BxLxHxK), k and v (BxLxGxK): one fused kernel when G = H (GPT-2's layout)."""
    cfg = self.config
    d, h, g, k = cfg.d_model, cfg.n_head, cfg.kv_heads, cfg.head_dim
    # nn.Einsum, not nn.DenseGeneral: DenseGeneral initializes a flattened kernel and
    # reshapes it, which breaks its logical-axis metadata under a mesh (flax 0.12).
    if g == h:
      qkv_BxLx3xHxK = _einsum(
          cfg, (d, 3, h, k), "bld,dthk->blthk", use_bias=cfg.qkv_bias,
          kernel_init=_init(0.02, ("embed", None, "heads", "kv")),
          bias_init=_zeros((None, "heads", "kv")), name="qkv")(x_BxLxD)
      qkv_BxLx3xHxK = nn.with_logical_constraint(
          qkv_BxLx3xHxK, ("batch", "sequence", None, "heads", "kv"))
      return tuple(qkv_BxLx3xHxK[:, :, i] for i in range(3))
    q_BxLxHxK = _einsum(
        cfg, (d, h, k), "bld,dhk->blhk", use_bias=cfg.qkv_bias,
        kernel_init=_init(0.02, ("embed", "heads", "kv")), bias_init=_zeros(("heads", "kv")),
        name="q")(x_BxLxD)
    kv_BxLx2xGxK = _einsum(
        cfg, (d, 2, g, k), "bld,dtgk->bltgk", use_bias=cfg.qkv_bias,
        kernel_init=_init(0.02, ("embed", None, "kv_heads", "kv")),
        bias_init=_zeros((None, "kv_heads", "kv")), name="kv")(x_BxLxD)
    return q_BxLxHxK, kv_BxLx2xGxK[:, :, 0], kv_BxLx2xGxK[:, :, 1]

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, cache: dict[str, jax.Array] | None,
               v_first_BxLxGxK=None, layer=None):
    """(BxLxD output, the updated cache, the first layer's values for `value_residual`)."""
    cfg = self.config
    residual_std = 0.02 / math.sqrt(2 * cfg.n_layer)
    q_BxLxHxK, k_BxLxGxK, v_BxLxGxK = self._projections(x_BxLxD)
    if cfg.value_residual:  # v = a v + b v_first; the cache holds the mixed values
      # The first layer's raw values: it has none to read (unscanned: None; scanned: zeros).
      v_first_BxLxGxK = v_BxLxGxK if v_first_BxLxGxK is None else jnp.where(
          layer == 0, v_BxLxGxK, v_first_BxLxGxK)
      v_first_BxLxGxK = nn.with_logical_constraint(
          v_first_BxLxGxK, ("batch", "sequence", "heads" if cfg.kv_heads == cfg.n_head
                            else "kv_heads", "kv"))
      a, b = (scalar(self, name, value).astype(v_BxLxGxK.dtype)
              for name, value in (("v_scale", 1.0), ("v_first_scale", 0.0)))
      v_BxLxGxK = a * v_BxLxGxK + b * v_first_BxLxGxK
    if cfg.qk_norm:
      q_BxLxHxK = _norm(cfg, "q_norm", axes=("kv",))(q_BxLxHxK)
      k_BxLxGxK = _norm(cfg, "k_norm", axes=("kv",))(k_BxLxGxK)
    if cfg.position == "rope":
      inv_freq_K2 = rope_frequencies(cfg)
      q_BxLxHxK = apply_rope(q_BxLxHxK, positions_BxL, inv_freq_K2)
      k_BxLxGxK = apply_rope(k_BxLxGxK, positions_BxL, inv_freq_K2)

    # Grouped-query attention: each of the G kv heads serves H / G query heads.
    if cache is None:
      out_BxLxHxK = attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, is_causal=True)
      new_cache = None
    else:
      # Each row writes its new keys/values at its own positions (prompts differ in length),
      # then attends to every cached position at or before its own. A cache may hold more rows
      # than the batch (a server's slots): the batch is its first B rows, the rest untouched.
      batch = x_BxLxD.shape[0]
      rows_Bx1 = jnp.arange(batch)[:, None]
      k_CxSxGxK = cache["k"].at[rows_Bx1, positions_BxL].set(k_BxLxGxK.astype(cache["k"].dtype))
      v_CxSxGxK = cache["v"].at[rows_Bx1, positions_BxL].set(v_BxLxGxK.astype(cache["v"].dtype))
      k_BxSxGxK, v_BxSxGxK = k_CxSxGxK[:batch], v_CxSxGxK[:batch]
      cache_positions_S = jnp.arange(k_BxSxGxK.shape[1])
      mask_BxLxS = cache_positions_S[None, None, :] <= positions_BxL[:, :, None]
      out_BxLxHxK = attention(
          q_BxLxHxK, k_BxSxGxK.astype(q_BxLxHxK.dtype), v_BxSxGxK.astype(q_BxLxHxK.dtype),
          mask=mask_BxLxS[:, None])
      new_cache = {"k": k_CxSxGxK, "v": v_CxSxGxK}

    out_BxLxD = _einsum(
        cfg, (cfg.n_head, cfg.head_dim, cfg.d_model), "blhk,hkd->bld", use_bias=cfg.bias,
        kernel_init=_output_init(cfg, residual_std, ("heads", "kv", "embed")),
        bias_init=_zeros(("embed",)), name="out")(out_BxLxHxK)
    return out_BxLxD, new_cache, v_first_BxLxGxK


class Block(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, carry, positions_BxL, cache, deterministic: bool, x0_BxLxD=None,
               layer=None):
    """carry: (the residual stream BxLxD, the first layer's values or None); x0_BxLxD: the
    embedding output (`x0_shortcut`); layer: this block's index (`value_residual`)."""
    cfg = self.config
    x_BxLxD, v_first_BxLxGxK = carry
    if cfg.x0_shortcut:  # x = lambda x + mu x0 (the speedrun's), the plain block at init
      lam, mu = (scalar(self, name, value).astype(x_BxLxD.dtype)
                 for name, value in (("x_scale", 1.0), ("x0_scale", 0.0)))
      x_BxLxD = lam * x_BxLxD + mu * x0_BxLxD
    drop = nn.Dropout(cfg.dropout, deterministic=deterministic)
    attn_BxLxD, cache, v_first_BxLxGxK = CausalSelfAttention(cfg, name="attn")(
        _norm(cfg, name="ln_1")(x_BxLxD), positions_BxL, cache, v_first_BxLxGxK, layer)
    x_BxLxD = x_BxLxD + drop(attn_BxLxD)
    x_BxLxD = x_BxLxD + drop(MLP(cfg, name="mlp")(_norm(cfg, name="ln_2")(x_BxLxD)))
    # Between blocks the residual stream is split by batch rows only: "batch" takes the
    # fsdp axis first, so "embed" stays whole here (and tensor-parallel outputs are summed).
    x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("batch", "sequence", "embed"))
    return (x_BxLxD, v_first_BxLxGxK), cache


def _blocks(cfg: ModelConfig):
  """The layer stack: a list of Blocks, or one scanned Block whose params have a layer axis."""
  block = Block
  if cfg.remat != "none":
    # deterministic (argument 4, counting self) is a Python bool: static. Inside a scan the
    # loop already keeps the recomputation from being merged away, so no CSE barrier there.
    block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers,
                     static_argnums=(4,))
  if not cfg.scan_layers:
    return [block(cfg) for _ in range(cfg.n_layer)]
  return nn.scan(
      block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
      in_axes=(nn.broadcast, 0, nn.broadcast, nn.broadcast, 0), length=cfg.n_layer,
      metadata_params={nn.PARTITION_NAME: "layers"})(cfg)


class GPT(nn.Module):
  """`apply(tokens_BxL)` gives logits; `method=GPT.encode` gives the final hidden states."""

  config: ModelConfig

  def setup(self):
    cfg = self.config
    self.wte = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype,
                        embedding_init=_init(cfg.embedding_init_std, ("vocab", "embed")))
    if cfg.position == "learned":
      self.wpe = nn.Embed(cfg.context_length, cfg.d_model, dtype=cfg.dtype,
                          embedding_init=_init(cfg.embedding_init_std, (None, "embed")))
    self.drop = nn.Dropout(cfg.dropout)
    self.blocks = _blocks(cfg)
    self.ln_f = _norm(cfg)
    if not cfg.tie_embeddings:
      self.lm_head = _dense(cfg, cfg.vocab_size, use_bias=False,
                            kernel_init=_output_init(cfg, 0.02, ("embed", "vocab")))

  def encode(self, tokens_BxL, positions_BxL=None, cache: KVCache | None = None,
             deterministic: bool = True):
    """Final (post-LayerNorm) hidden states, BxLxD, and the updated cache (None without one)."""
    length = tokens_BxL.shape[1]
    if positions_BxL is None:
      if length > self.config.context_length:
        raise ValueError(f"sequence length {length} exceeds context_length "
                         f"{self.config.context_length}")
      positions_BxL = jnp.broadcast_to(jnp.arange(length), tokens_BxL.shape)
    # Look rows up in tables whose d_model side is whole: under FSDP it is split, and a lookup
    # into a split table makes XLA replicate the result to split it by batch rows instead.
    dtype = self.config.dtype
    wte_VxD = nn.with_logical_constraint(self.wte.embedding.astype(dtype), ("vocab", None))
    x_BxLxD = jnp.take(wte_VxD, tokens_BxL, axis=0)
    if self.config.position == "learned":  # rotary positions act inside attention instead
      wpe_TxD = nn.with_logical_constraint(self.wpe.embedding.astype(dtype), (None, None))
      x_BxLxD = x_BxLxD + jnp.take(wpe_TxD, positions_BxL, axis=0)
    x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("batch", "sequence", "embed"))
    x_BxLxD = self.drop(x_BxLxD, deterministic=deterministic)
    x0_BxLxD = x_BxLxD if self.config.x0_shortcut else None
    if self.config.scan_layers:
      # The cache is stacked (LxBxSxHxK, as init_cache makes it): one layer per iteration,
      # never copied into or out of a per-layer list.
      (x_BxLxD, _), cache = self.blocks(
          (x_BxLxD, self._first_values(tokens_BxL.shape)), positions_BxL, cache,
          deterministic, x0_BxLxD,
          jnp.arange(self.config.n_layer) if self.config.value_residual else None)
      return self.ln_f(x_BxLxD), cache
    new_cache = [] if cache is not None else None
    carry = (x_BxLxD, None)
    for i, block in enumerate(self.blocks):
      carry, layer_cache = block(carry, positions_BxL, None if cache is None else cache[i],
                                 deterministic, x0_BxLxD, i)
      if cache is not None:
        new_cache.append(layer_cache)
    return self.ln_f(carry[0]), new_cache

  def _first_values(self, shape_BxL):
    """The scan's carry of the first layer's values before there are any (`value_residual`;
    else None): zeros the first block replaces."""
    cfg = self.config
    if not cfg.value_residual:
      return None
    return jnp.zeros((*shape_BxL, cfg.kv_heads, cfg.head_dim), jnp.dtype(cfg.dtype))

  def logits(self, hidden_BxLxD):
    """The LM head: float32 logits (float64 under model.dtype=float64), BxLxV; soft-capped
    under `logit_softcap` (every caller's logits come from here: loss, evaluation, generation)."""
    if self.config.tie_embeddings and self.config.matmul_dtype == "bfloat16":
      hidden_NxD = hidden_BxLxD.reshape(-1, hidden_BxLxD.shape[-1])
      logits_BxLxV = matmul.bf16_matmul(hidden_NxD, self.wte.embedding, True).reshape(
          hidden_BxLxD.shape[:-1] + (-1,))
    elif self.config.tie_embeddings:
      logits_BxLxV = self.wte.attend(hidden_BxLxD)
    else:
      logits_BxLxV = self.lm_head(hidden_BxLxD)
    logits_BxLxV = logits_BxLxV.astype(jnp.promote_types(self.config.dtype, jnp.float32))
    if self.config.logit_softcap:  # Gemma 2's soft cap, |logits| < C
      cap = self.config.logit_softcap
      logits_BxLxV = cap * jnp.tanh(logits_BxLxV / cap)
    return nn.with_logical_constraint(logits_BxLxV, ("batch", "sequence", "vocab"))

  def __call__(self, tokens_BxL, deterministic: bool = True, return_hidden: bool = False):
    hidden_BxLxD, _ = self.encode(tokens_BxL, deterministic=deterministic)
    logits_BxLxV = self.logits(hidden_BxLxD)
    return (logits_BxLxV, hidden_BxLxD) if return_hidden else logits_BxLxV


def init_cache(config: ModelConfig, batch_size: int, length: int | None = None,
               dtype: Any = None) -> KVCache:
  """An empty KV cache for `length` positions (default: the context length): a list of
  {"k", "v"} BxSxHxK arrays per layer, or for `scan_layers` one {"k", "v"} of LxBxSxHxK."""
  length = length or config.context_length
  shape = (batch_size, length, config.kv_heads, config.head_dim)
  dtype = dtype or jnp.dtype(config.dtype)
  if config.scan_layers:
    stacked = (config.n_layer, *shape)
    return {"k": jnp.zeros(stacked, dtype), "v": jnp.zeros(stacked, dtype)}
  return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
          for _ in range(config.n_layer)]


def abstract_variables(model: GPT) -> Any:
  """Shapes, dtypes and logical axes of `model.init`, without allocating anything."""
  dummy = jnp.zeros((1, 1), jnp.int32)
  return jax.eval_shape(lambda rng: model.init(rng, dummy), jax.random.key(0))


def init_params(model: GPT, rng: jax.Array) -> Any:
  """Fresh parameters as a plain pytree of float32 arrays (float64 under model.dtype=float64)."""
  dummy = jnp.zeros((1, 1), jnp.int32)
  return param_dtype(model.config, nn.unbox(model.init(rng, dummy)["params"]))


def param_dtype(config: Any, params: Any) -> Any:
  """Parameters in the dtype `config` keeps them in: float32, or float64 for model.dtype=float64
  (Linen creates float32 parameters whatever the compute dtype)."""
  if config.dtype != "float64":
    return params
  return jax.tree.map(lambda x: x.astype(jnp.float64), params)


def logical_axes(model: GPT) -> Any:
  """A pytree like the params holding each parameter's logical axis names (a PartitionSpec)."""
  return nn.get_partition_spec(abstract_variables(model))["params"]


def count_params(params: Any) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
