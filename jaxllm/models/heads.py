"""Heads over the backbone's hidden states, as pure `init(rng, ...) -> params` and
`apply(params, hidden) -> output` pairs. The LM head is the GPT's own (`GPT.logits`), so
next-token tasks use it, not a copy here.

The backbone is `GPT.encode` (final, post-LayerNorm hidden states); a finetuned model's
parameters are one pytree `{"backbone": <GPT params>, "head": <head params>}`, so which parts
train is an optax mask over that tree (see `jaxllm/tasks/common.py`), never a code change.

- Classification head: a Linear on the last real (non-padding) token, the one whose causal
  attention has seen the whole text (the book's ch. 6 head, minus its padding blind spot);
  on an encoder, on its pooled state instead (`tasks.losses.pooled`).

Shapes are in the names: B batch, L sequence, D d_model, C classes.
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


# --- Classification head -------------------------------------------------------------------


def classifier_init(rng: jax.Array, d_model: int, num_classes: int) -> Params:
  return {"kernel": _normal(rng, (d_model, num_classes)),
          "bias": jnp.zeros((num_classes,), jnp.float32)}


def classifier_apply(params: Params, hidden_BxD: jax.Array) -> jax.Array:
  """float32 class logits BxC (float64 from float64 states) of one hidden state per row (pick
  it with `last_token`)."""
  hidden_BxD = hidden_BxD.astype(_at_least_float32(hidden_BxD))
  return hidden_BxD @ params["kernel"] + params["bias"]
