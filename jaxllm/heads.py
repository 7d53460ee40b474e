"""Heads over the backbone's hidden states, as pure `init(rng, ...) -> params` and
`apply(params, hidden) -> output` pairs.

The backbone is `GPT.encode` (final, post-LayerNorm hidden states); a finetuned model's
parameters are one pytree `{"backbone": <GPT params>, "head": <head params>}`, so which parts
train is an optax mask over that tree (see `jaxllm/tasks/common.py`), never a code change.

- LM head: next-token logits; tied to the token embedding (GPT-2) or its own kernel.
- Classification head: a Linear on the last real (non-padding) token, the one whose causal
  attention has seen the whole text (the book's ch. 6 head, minus its padding blind spot);
  on an encoder, on its pooled state instead (`tasks.losses.pooled`).
- Reward head: one scalar per sequence from the same last token, for preference models.

Shapes are in the names: B batch, L sequence, D d_model, V vocabulary, C classes.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Params = dict[str, Any]


def _at_least_float32(x: jax.Array) -> jnp.dtype:
  """float32 for bfloat16 or float32 arrays, float64 for float64 ones (model.dtype=float64)."""
  return jnp.promote_types(x.dtype, jnp.float32)


def _normal(rng: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  # GPT-2's initialisation scale, as the backbone's own Linear layers use.
  return 0.02 * jax.random.normal(rng, shape, jnp.float32)


def last_token(hidden_BxLxD: jax.Array, length_B: jax.Array) -> jax.Array:
  """Each row's hidden state at its last real token, index length - 1: BxD.

  With right padding and causal attention, nothing after that position can reach it, so
  the padding's length and ids cannot change the result.
  """
  return hidden_BxLxD[jnp.arange(hidden_BxLxD.shape[0]), length_B - 1]


# --- LM head -------------------------------------------------------------------------------


def lm_init(rng: jax.Array, d_model: int, vocab_size: int) -> Params:
  """An untied output projection, DxV."""
  return {"kernel": _normal(rng, (d_model, vocab_size))}


def lm_params(backbone_params: Params) -> Params:
  """The LM head a GPT's own parameters hold: its lm_head kernel, or the tied embedding."""
  if "lm_head" in backbone_params:
    return {"kernel": backbone_params["lm_head"]["kernel"]}
  return {"embedding": backbone_params["wte"]["embedding"]}


def lm_apply(params: Params, hidden_BxLxD: jax.Array) -> jax.Array:
  """float32 logits BxLxV, float64 from float64 states (GPT.logits as a pure function)."""
  if "embedding" in params:  # tied: the transposed token embedding
    weight_VxD = params["embedding"].astype(hidden_BxLxD.dtype)
    logits_BxLxV = jnp.einsum("bld,vd->blv", hidden_BxLxD, weight_VxD)
  else:
    logits_BxLxV = hidden_BxLxD @ params["kernel"].astype(hidden_BxLxD.dtype)
  return logits_BxLxV.astype(_at_least_float32(logits_BxLxV))


# --- Classification head -------------------------------------------------------------------


def classifier_init(rng: jax.Array, d_model: int, num_classes: int) -> Params:
  return {"kernel": _normal(rng, (d_model, num_classes)),
          "bias": jnp.zeros((num_classes,), jnp.float32)}


def classifier_apply(params: Params, hidden_BxD: jax.Array) -> jax.Array:
  """float32 class logits BxC (float64 from float64 states) of one hidden state per row (pick
  it with `last_token`)."""
  hidden_BxD = hidden_BxD.astype(_at_least_float32(hidden_BxD))
  return hidden_BxD @ params["kernel"] + params["bias"]


# --- Reward head ---------------------------------------------------------------------------


def reward_init(rng: jax.Array, d_model: int) -> Params:
  return {"kernel": _normal(rng, (d_model, 1)), "bias": jnp.zeros((1,), jnp.float32)}


def reward_apply(params: Params, hidden_BxD: jax.Array) -> jax.Array:
  """One float32 score per row, B."""
  return (hidden_BxD.astype(_at_least_float32(hidden_BxD)) @ params["kernel"]
          + params["bias"])[:, 0]
