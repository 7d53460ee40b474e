"""Text generation: sampling from logits and KV-cached autoregressive decoding.

`generate` prefills the right-padded batch of prompts once, then decodes one token per step,
each row writing its keys/values at its own positions in the cache; prefill and the whole
decode loop are one jitted function, so a new token costs one position, not the prefix.
Past the context length, each new token re-runs the last context_length tokens of its row
(nanoGPT's crop: every token sees a full window; with learned absolute positions a cache
cannot slide, since every position's embedding changes). `generate_uncached` re-runs every
sequence (cropped the same way) each step: slow, but it never touches the cache, which is
what makes it a reference for tests.

Ids at or past `vocab_size` (a vocabulary padded for tensor parallelism,
`model.vocab_size` > the tokenizer's) are never sampled: their logits are masked.

Shapes are in the names: B batch, P padded prompt length, N new tokens, V vocabulary, D d_model.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.data.tokenizer import Tokenizer
from jaxllm.errors import JaxllmError
from jaxllm.models.gpt import GPT, init_cache

# Marks output slots after a row stopped at eot (never a real token id).
_STOPPED = -1


def sample_logits(rng: jax.Array, logits_BxV: jax.Array, temperature: float, top_k: int,
                  top_p: float) -> jax.Array:
  """One token per row. temperature 0 is greedy; top_k 0 and top_p 1.0 switch those filters off.

  top_k keeps the k largest logits; top_p then keeps the smallest set of the most likely of
  those whose probability sums to at least p (never fewer than one token).
  """
  if temperature == 0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = logits_BxV.astype(jnp.float32) / temperature
  vocab_size = logits_BxV.shape[-1]
  if top_k <= 0 and top_p >= 1.0:
    return jax.random.categorical(rng, logits_BxV, axis=-1).astype(jnp.int32)

  # Filtering happens in sorted order and the draw is mapped back through the sort indices,
  # so tied logits at the cut-off cannot smuggle extra tokens past top_k or top_p.
  k = min(top_k, vocab_size) if top_k > 0 else vocab_size
  sorted_logits_BxK, sorted_ids_BxK = jax.lax.top_k(logits_BxV, k)
  if top_p < 1.0:
    probs_BxK = jax.nn.softmax(sorted_logits_BxK, axis=-1)
    mass_before_BxK = jnp.cumsum(probs_BxK, axis=-1) - probs_BxK
    # A token is in the nucleus if the more likely tokens alone have not yet reached p;
    # the most likely token always is (mass before it is 0 < p).
    in_nucleus_BxK = mass_before_BxK < top_p
    sorted_logits_BxK = jnp.where(in_nucleus_BxK, sorted_logits_BxK, -jnp.inf)
  choice_B = jax.random.categorical(rng, sorted_logits_BxK, axis=-1)
  return jnp.take_along_axis(sorted_ids_BxK, choice_B[:, None], axis=-1)[:, 0].astype(jnp.int32)


def _check_request(model: GPT, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                   temperature: float, top_k: int, top_p: float,
                   vocab_size: int | None = None) -> None:
  cfg = model.config
  if not prompts:
    raise JaxllmError("generate needs at least one prompt")
  for i, prompt in enumerate(prompts):
    if len(prompt) == 0:
      raise JaxllmError(f"prompt {i} is empty (generation needs at least one token to start from)")
    if min(prompt) < 0 or max(prompt) >= cfg.vocab_size:
      raise JaxllmError(f"prompt {i} has token ids outside [0, {cfg.vocab_size}) "
                        f"(vocab_size {cfg.vocab_size}); was it encoded with another tokenizer?")
  if max_new_tokens < 0:
    raise JaxllmError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
  longest = max(len(p) for p in prompts)
  if longest > cfg.context_length:
    raise JaxllmError(f"a prompt of {longest} tokens is longer than the context length "
                      f"{cfg.context_length}; shorten it")
  if vocab_size is not None and not 0 < vocab_size <= cfg.vocab_size:
    raise JaxllmError(f"vocab_size {vocab_size} must be in [1, model vocab_size "
                      f"{cfg.vocab_size}]")
  if temperature < 0:
    raise JaxllmError(f"temperature must be >= 0, got {temperature}")
  if top_k < 0:
    raise JaxllmError(f"top_k must be >= 0 (0 = off), got {top_k}")
  if not 0.0 < top_p <= 1.0:
    raise JaxllmError(f"top_p must be in (0, 1] (1.0 = off), got {top_p}")


def _pad(prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
  """Right-padded prompts (pad id 0, never attended to) and their lengths."""
  lengths_B = np.array([len(p) for p in prompts], np.int32)
  tokens_BxP = np.zeros((len(prompts), lengths_B.max()), np.int32)
  for row, prompt in enumerate(prompts):
    tokens_BxP[row, :len(prompt)] = prompt
  return tokens_BxP, lengths_B


def _trim(out_BxN: np.ndarray) -> list[list[int]]:
  """Each row's tokens up to the first stopped slot."""
  rows = []
  for out_N in out_BxN:
    stopped = np.flatnonzero(out_N == _STOPPED)
    rows.append([int(t) for t in out_N[:stopped[0] if stopped.size else len(out_N)]])
  return rows


def _allowed(logits_BxV: jax.Array, vocab_size: int | None) -> jax.Array:
  """Logits with the ids at or past `vocab_size` (padding of the vocabulary) masked out."""
  if vocab_size is None or vocab_size >= logits_BxV.shape[-1]:
    return logits_BxV
  return jnp.where(jnp.arange(logits_BxV.shape[-1]) < vocab_size, logits_BxV, -jnp.inf)


def _window_logits(model: GPT, params: Any, tokens_BxT: jax.Array, length_B: jax.Array
                   ) -> jax.Array:
  """Next-token logits of each row's first `length_B` tokens, seen through the last
  context_length of them (positions renumbered from 0, as in training): BxV."""
  window = min(model.config.context_length, tokens_BxT.shape[1])
  start_B = jnp.maximum(length_B - window, 0)
  index_BxW = jnp.minimum(start_B[:, None] + jnp.arange(window), tokens_BxT.shape[1] - 1)
  hidden_BxWxD, _ = model.apply({"params": params}, jnp.take_along_axis(tokens_BxT, index_BxW, 1),
                                method=model.encode)
  last_Bx1xD = hidden_BxWxD[jnp.arange(tokens_BxT.shape[0]), length_B - start_B - 1][:, None]
  return model.apply({"params": params}, last_Bx1xD, method=model.logits)[:, 0]


# Static arguments key jit's compilation cache: a second call with the same model config,
# shapes and sampling settings reuses the compiled loop. GPT modules hash by their config.
@functools.partial(jax.jit, static_argnames=(
    "model", "max_new_tokens", "temperature", "top_k", "top_p", "eot_id", "vocab_size"))
def _generate_cached(model: GPT, params: Any, tokens_BxP: jax.Array, lengths_B: jax.Array,
                     rng: jax.Array, *, max_new_tokens: int, temperature: float, top_k: int,
                     top_p: float, eot_id: int | None, vocab_size: int | None) -> jax.Array:
  """New tokens, BxN, with _STOPPED after a row's eot (and in place of the eot itself).

  Steps 0 .. C - P (C the context length, P the longest prompt) decode with the KV cache;
  later steps, past the context, re-run each row's last C tokens.
  """
  batch_size, prompt_length = tokens_BxP.shape
  rows_B = jnp.arange(batch_size)
  cached_steps = min(max_new_tokens, model.config.context_length - prompt_length + 1)
  cache = init_cache(model.config, batch_size,
                     min(prompt_length + max_new_tokens, model.config.context_length))

  # Prefill: padding writes garbage at each short row's positions >= its length, but the
  # decode steps overwrite those before any query at or past them can attend to them.
  positions_BxP = jnp.broadcast_to(jnp.arange(prompt_length), tokens_BxP.shape)
  hidden_BxPxD, cache = model.apply({"params": params}, tokens_BxP, positions_BxP, cache,
                                    method=model.encode)
  last_hidden_Bx1xD = hidden_BxPxD[rows_B, lengths_B - 1][:, None]
  logits_BxV = model.apply({"params": params}, last_hidden_Bx1xD, method=model.logits)[:, 0]

  def emit(step, logits_BxV, done_B, out_BxN):
    token_B = sample_logits(jax.random.fold_in(rng, step), _allowed(logits_BxV, vocab_size),
                            temperature, top_k, top_p)
    if eot_id is not None:
      done_B = done_B | (token_B == eot_id)
    out_BxN = out_BxN.at[:, step].set(jnp.where(done_B, _STOPPED, token_B))
    return token_B, done_B, out_BxN

  out_BxN = jnp.full((batch_size, max_new_tokens), _STOPPED, jnp.int32)
  token_B, done_B, out_BxN = emit(0, logits_BxV, jnp.zeros(batch_size, bool), out_BxN)

  def keep_going(end):
    return lambda state: (state[0] < end) & ~jnp.all(state[2])

  def decode_step(state):
    step, token_B, done_B, out_BxN, cache = state
    # The token emitted at step-1 sits at position length + step - 1. Stopped rows keep
    # decoding (a batch moves in lockstep); their output is masked, their cache unused.
    positions_Bx1 = (lengths_B + step - 1)[:, None]
    hidden_Bx1xD, cache = model.apply({"params": params}, token_B[:, None], positions_Bx1, cache,
                                      method=model.encode)
    logits_BxV = model.apply({"params": params}, hidden_Bx1xD, method=model.logits)[:, 0]
    token_B, done_B, out_BxN = emit(step, logits_BxV, done_B, out_BxN)
    return step + 1, token_B, done_B, out_BxN, cache

  state = (jnp.int32(1), token_B, done_B, out_BxN, cache)
  step, _, done_B, out_BxN, _ = jax.lax.while_loop(keep_going(cached_steps), decode_step, state)
  if cached_steps == max_new_tokens:
    return out_BxN
  return _decode_past_context(model, params, tokens_BxP, lengths_B, (step, done_B, out_BxN),
                              emit, keep_going(max_new_tokens))


def _decode_past_context(model, params, tokens_BxP, lengths_B, state, emit, keep_going):
  """The steps after the cached ones: each row's tokens so far in one buffer, the window of
  the last context_length re-run for every new token."""
  step, done_B, out_BxN = state
  rows_B = jnp.arange(tokens_BxP.shape[0])
  max_new_tokens = out_BxN.shape[1]
  tokens_BxT = jnp.concatenate([tokens_BxP, jnp.zeros_like(out_BxN)], axis=1)
  tokens_BxT = tokens_BxT.at[rows_B[:, None], lengths_B[:, None] + jnp.arange(max_new_tokens)
                             ].set(jnp.maximum(out_BxN, 0), mode="drop")

  def window_step(state):
    step, tokens_BxT, done_B, out_BxN = state
    logits_BxV = _window_logits(model, params, tokens_BxT, lengths_B + step)
    token_B, done_B, out_BxN = emit(step, logits_BxV, done_B, out_BxN)
    return step + 1, tokens_BxT.at[rows_B, lengths_B + step].set(token_B), done_B, out_BxN

  _, _, _, out_BxN = jax.lax.while_loop(keep_going, window_step,
                                        (step, tokens_BxT, done_B, out_BxN))
  return out_BxN


def generate(model: GPT, params: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             eot_id: int | None = None, vocab_size: int | None = None) -> list[list[int]]:
  """The new tokens of each prompt (KV-cached). A row stops at eot_id, which is not returned;
  ids at or past `vocab_size` (default: the model's) are never sampled."""
  _check_request(model, prompts, max_new_tokens, temperature, top_k, top_p, vocab_size)
  if max_new_tokens == 0:
    return [[] for _ in prompts]
  tokens_BxP, lengths_B = _pad(prompts)
  out_BxN = _generate_cached(
      model, params, jnp.asarray(tokens_BxP), jnp.asarray(lengths_B), jax.random.key(seed),
      max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_k=int(top_k),
      top_p=float(top_p), eot_id=None if eot_id is None else int(eot_id),
      vocab_size=None if vocab_size is None else int(vocab_size))
  return _trim(np.asarray(out_BxN))


def generate_uncached(model: GPT, params: Any, prompts: Sequence[Sequence[int]],
                      max_new_tokens: int, *, temperature: float = 1.0, top_k: int = 0,
                      top_p: float = 1.0, seed: int = 0, eot_id: int | None = None,
                      vocab_size: int | None = None) -> list[list[int]]:
  """`generate` without a cache: each step re-runs every sequence so far (its last
  context_length tokens). A test reference.

  Uses the same per-step random keys as `generate`, so the two agree under sampling too
  (up to float rounding of the logits).
  """
  _check_request(model, prompts, max_new_tokens, temperature, top_k, top_p, vocab_size)
  rng = jax.random.key(seed)
  tokens_BxT, lengths_B = _pad(prompts)
  # One fixed-size buffer (longest prompt + N) so the forward compiles once. Its right
  # padding is harmless without a cache: causal attention keeps it out of every real
  # position, and each row's logits are read at its own last token.
  tokens_BxT = np.pad(tokens_BxT, ((0, 0), (0, max_new_tokens)))
  out_BxN = np.full((len(prompts), max_new_tokens), _STOPPED, np.int32)
  done_B = np.zeros(len(prompts), bool)
  logits_fn = jax.jit(_window_logits, static_argnums=0)
  for step in range(max_new_tokens):
    if done_B.all():
      break
    logits_BxV = logits_fn(model, params, jnp.asarray(tokens_BxT), jnp.asarray(lengths_B))
    token_B = np.asarray(sample_logits(jax.random.fold_in(rng, step),
                                       _allowed(logits_BxV, vocab_size), temperature, top_k,
                                       top_p))
    if eot_id is not None:
      done_B |= token_B == eot_id
    out_BxN[:, step] = np.where(done_B, _STOPPED, token_B)
    tokens_BxT[np.arange(len(prompts)), lengths_B] = token_B
    lengths_B += 1
  return _trim(out_BxN)


def generate_text(model: GPT, params: Any, tokenizer: Tokenizer, prompt: str | list[str],
                  max_new_tokens: int, **sampling) -> str | list[str]:
  """Completions of one prompt or a list, stopping at the tokenizer's `<|endoftext|>`.

  `sampling` takes generate's keywords (temperature, top_k, top_p, seed, eot_id).
  """
  prompts = [prompt] if isinstance(prompt, str) else list(prompt)
  sampling.setdefault("eot_id", tokenizer.eot_id)
  sampling.setdefault("vocab_size", tokenizer.vocab_size)  # never a padded id
  new_tokens = generate(model, params, [tokenizer.encode(p) for p in prompts], max_new_tokens,
                        **sampling)
  texts = [tokenizer.decode(tokens) for tokens in new_tokens]
  return texts[0] if isinstance(prompt, str) else texts
