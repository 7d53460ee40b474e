"""The serving engine's compiled programs and its per-row sampling.

Each program takes the model as a static argument (a GPT hashes by its config) and the
sampling settings as arrays, one value per row, so one compilation serves every request:
`prefill` (one prompt, padded to a bucket length, into one slot of the cache), `decode` (one
token for every slot), `window` (past the context, a row's last context_length tokens re-run)
and `score` (a prompt's own logprobs, for echo).

Shapes are in the names: S slots, P padded prompt length, V vocabulary, K top alternatives.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxllm.serve.generate import _window_logits


def prefill_buckets(context_length: int, smallest: int = 16) -> tuple[int, ...]:
  """Prompt lengths compiled for: powers of two from `smallest`, and the context length."""
  buckets, length = [], smallest
  while length < context_length:
    buckets.append(length)
    length *= 2
  return (*buckets, context_length)


def batch_axis(leaf: jax.Array) -> int:
  return 1 if leaf.ndim == 5 else 0  # scan_layers' stacked cache: LxSxCxGxK


def sample_rows(logits_SxV: jax.Array, seeds_S: jax.Array, steps_S: jax.Array,
                temperature_S: jax.Array, top_k_S: jax.Array, top_p_S: jax.Array,
                top_logprobs: int) -> tuple[jax.Array, ...]:
  """One token per row, each row with its own sampling settings and random stream
  (fold_in(key(seed), step)): the token, its logprob under the model, and the top
  `top_logprobs` (ids, logprobs) of the model's distribution (empty when 0)."""
  logprobs_SxV = jax.nn.log_softmax(logits_SxV.astype(jnp.float32), axis=-1)
  greedy_S = jnp.argmax(logits_SxV, axis=-1).astype(jnp.int32)
  vocab = logits_SxV.shape[-1]
  wants_filter_S = ((top_k_S > 0) | (top_p_S < 1.0)) & (temperature_S > 0)

  def filtered(key, scaled_V, top_k, top_p):  # top_k, then top_p, in sorted order
    sorted_V, ids_V = jax.lax.top_k(scaled_V, vocab)  # (ties cannot slip through)
    keep_V = jnp.arange(vocab) < jnp.where(top_k > 0, top_k, vocab)
    sorted_V = jnp.where(keep_V, sorted_V, -jnp.inf)
    probs_V = jax.nn.softmax(sorted_V)
    keep_V = keep_V & ((jnp.cumsum(probs_V) - probs_V < top_p) | (top_p >= 1.0))
    return ids_V[jax.random.categorical(key, jnp.where(keep_V, sorted_V, -jnp.inf))]

  def draws(_):  # only for a step where some row samples; the full sort only where some
    keys_S = jax.vmap(lambda seed, step: jax.random.fold_in(jax.random.key(seed), step))(
        seeds_S, steps_S)  # row filters, and a row that does not keeps its plain draw
    scaled_SxV = logits_SxV.astype(jnp.float32) / jnp.maximum(temperature_S, 1e-6)[:, None]
    plain_S = jax.vmap(jax.random.categorical)(keys_S, scaled_SxV).astype(jnp.int32)
    return jax.lax.cond(jnp.any(wants_filter_S), lambda _: jnp.where(
        wants_filter_S, jax.vmap(filtered)(keys_S, scaled_SxV, top_k_S, top_p_S), plain_S),
        lambda _: plain_S, None)

  sampled_S = jax.lax.cond(jnp.any(temperature_S > 0), draws, lambda _: greedy_S, None)
  token_S = jnp.where(temperature_S == 0, greedy_S, sampled_S.astype(jnp.int32))
  logprob_S = jnp.take_along_axis(logprobs_SxV, token_S[:, None], axis=-1)[:, 0]
  if top_logprobs:
    top_lp_SxK, top_ids_SxK = jax.lax.top_k(logprobs_SxV, top_logprobs)
  else:
    top_lp_SxK = jnp.zeros((logits_SxV.shape[0], 0), jnp.float32)
    top_ids_SxK = jnp.zeros((logits_SxV.shape[0], 0), jnp.int32)
  return token_S, logprob_S, top_ids_SxK, top_lp_SxK


def masked(logits_SxV: jax.Array, vocab_size: int) -> jax.Array:
  """Ids at or past the tokenizer's vocabulary (padding for tensor parallelism) never sampled."""
  if vocab_size >= logits_SxV.shape[-1]:
    return logits_SxV
  return jnp.where(jnp.arange(logits_SxV.shape[-1]) < vocab_size, logits_SxV, -jnp.inf)


def rows(cache: Any, slot: jax.Array) -> Any:
  return jax.tree.map(lambda leaf: jax.lax.dynamic_slice_in_dim(leaf, slot, 1, batch_axis(leaf)),
                      cache)


@functools.partial(jax.jit, static_argnames=("model", "vocab_size", "top"),
                   donate_argnames=("cache",))
def prefill(model, params, cache, tokens_1xP, length, slot, *sampling, vocab_size, top):
  """Encodes one prompt into row `slot` of the cache; samples its first token."""
  positions_1xP = jnp.arange(tokens_1xP.shape[1])[None]
  hidden_1xPxD, row = model.apply({"params": params}, tokens_1xP, positions_1xP,
                                  rows(cache, slot), method=model.encode)
  last_1x1xD = jax.lax.dynamic_slice_in_dim(hidden_1xPxD, length - 1, 1, axis=1)
  logits_1xV = model.apply({"params": params}, last_1x1xD, method=model.logits)[:, 0]
  cache = jax.tree.map(
      lambda leaf, new: jax.lax.dynamic_update_slice_in_dim(leaf, new, slot, batch_axis(leaf)),
      cache, row)
  return cache, *sample_rows(masked(logits_1xV, vocab_size), *sampling, top)


def row_buckets(slots: int) -> tuple[int, ...]:
  """How many of the first slots a decode step may run over: powers of two, and all."""
  buckets, rows = [], 1
  while rows < slots:
    buckets.append(rows)
    rows *= 2
  return (*buckets, slots)


@functools.partial(jax.jit, static_argnames=("model", "vocab_size", "top"),
                   donate_argnames=("cache",))
def decode(model, params, cache, tokens_R, positions_R, *sampling, vocab_size, top):
  """One token for each of the cache's first R slots (R = len(tokens_R), the live ones among
  them), each fed its last token at its own position. The model reads and writes only those
  rows of the cache, in place, so a step's cost follows the slots in use."""
  hidden_Rx1xD, cache = model.apply({"params": params}, tokens_R[:, None], positions_R[:, None],
                                    cache, method=model.encode)
  logits_RxV = model.apply({"params": params}, hidden_Rx1xD, method=model.logits)[:, 0]
  return cache, *sample_rows(masked(logits_RxV, vocab_size), *sampling, top)


@functools.partial(jax.jit, static_argnames=("model", "vocab_size", "top"))
def window(model, params, tokens_1xC, *sampling, vocab_size, top):
  """Past the context: the next token from the last context_length tokens, re-run."""
  logits_1xV = _window_logits(model, params, tokens_1xC, jnp.array([tokens_1xC.shape[1]]))
  return sample_rows(masked(logits_1xV, vocab_size), *sampling, top)


@functools.partial(jax.jit, static_argnames=("model", "vocab_size", "top"))
def score(model, params, tokens_1xP, *, vocab_size, top):
  """Each position's logprob of the next token, and the top alternatives there."""
  logits_PxV = masked(model.apply({"params": params}, tokens_1xP)[0], vocab_size)
  logprobs_PxV = jax.nn.log_softmax(logits_PxV.astype(jnp.float32), axis=-1)
  next_P = jnp.concatenate([tokens_1xP[0, 1:], jnp.zeros(1, tokens_1xP.dtype)])
  lp_P = jnp.take_along_axis(logprobs_PxV, next_P[:, None], axis=-1)[:, 0]
  top_lp_PxK, top_ids_PxK = jax.lax.top_k(logprobs_PxV, max(top, 1))
  return lp_P, top_lp_PxK, top_ids_PxK
