"""Rows of tokens scored, and prompts decoded, in fixed shapes on the mesh: the device side of
jaxllm/eval/harness.py (lm-evaluation-harness in-process), which needs nothing of lm_eval.

Fixed shapes, one compile each: a row (a request, or a window) is padded on the right to the
smallest bucket length holding it (powers of two from 16, and the context length), and rows
go to the devices in batches of exactly the batch size (the last filled with empty rows).
Causal attention keeps the padding out of every real position.

Rows that share a prefix of at least SHARED_PREFIX tokens (a multiple-choice task's choices
after one context) run it once: each batch of them holds up to batch size / 4 prefixes, each
run once into a KV cache, and the batch size of rows, each running only its scored positions
after its prefix's cache (the LM head on those positions alone).

Several processes (a multi-host slice, `jaxllm launch local --processes N -- eval ...`): the
harness runs on process 0 alone, as Levanter runs it. For each batch process 0 broadcasts a
header (int32 [kind, rows, length, max_new_tokens, top_k, seed], float32 [temperature, top_p])
and then the batch's arrays (`multihost_utils.broadcast_one_to_all`); every process, in
`Devices.serve` on the others, runs the same jitted program on the same global batch, each
feeding the rows its devices hold; process 0 sends a stop header at the end (an error
included).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections import defaultdict
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxllm.errors import JaxllmError
from jaxllm.models.gpt import GPT, init_cache
from jaxllm.serve import generate as generate_lib
from jaxllm.training import multihost, sharding

SMALLEST_BUCKET = 16
# A shorter shared prefix saves less than another program costs; suffixes are a few tokens.
SHARED_PREFIX, SMALLEST_SUFFIX = 16, 4
# Headers of the batches process 0 sends the others.
_STOP, _SCORE, _GENERATE, _SHARED = 0, 1, 2, 3


def bucket_lengths(context_length: int, smallest: int = SMALLEST_BUCKET) -> tuple[int, ...]:
  """The padded lengths rows take: powers of two from `smallest`, then the context length."""
  lengths, length = [], smallest
  while length < context_length:
    lengths.append(length)
    length *= 2
  return (*lengths, context_length)


def bucket_for(length: int, buckets: Sequence[int]) -> int:
  """The smallest bucket of at least `length`."""
  for bucket in buckets:
    if length <= bucket:
      return bucket
  raise ValueError(f"a row of {length} tokens is longer than the longest bucket {buckets[-1]}")


@dataclasses.dataclass(frozen=True)
class Row:
  """One scored sequence: the network reads `tokens`, position i predicts `targets[i]`, and
  the last `scored` positions count."""

  tokens: Sequence[int]
  targets: Sequence[int]
  scored: int


def continuation_row(context: Sequence[int], continuation: Sequence[int],
                     context_length: int) -> Row:
  """A (context, continuation) pair as a Row, cut from the left to context_length + 1
  tokens as lm_eval's `hf` model cuts it."""
  if len(continuation) > context_length:
    raise JaxllmError(f"a continuation of {len(continuation)} tokens is longer than the "
                      f"context length {context_length}; it cannot be scored in one window")
  whole = (list(context) + list(continuation))[-(context_length + 1):]
  return Row(whole[:-1], whole[1:], len(continuation))


Scores = tuple[np.ndarray, np.ndarray]  # per row of a batch: log-probability, all greedy


def score_rows(devices: "Devices", rows: Sequence[Row], size: int, buckets: Sequence[int],
               update: Callable[[int], Any] = lambda n: None) -> list[tuple[float, bool]]:
  """(sum of log-probabilities, all greedy) of each row, in order, in batches of `size`
  rows: rows sharing a prefix of SHARED_PREFIX tokens or more (one fitting the context with
  its suffix bucket) through `score_shared`, the others by bucket, longest first."""
  results: list[tuple[float, bool] | None] = [None] * len(rows)
  plain, groups = [], defaultdict(list)
  for i, row in enumerate(rows):
    if row.scored == 0:  # an empty continuation: probability 1
      results[i] = (0.0, True)
    elif len(row.tokens) - row.scored >= SHARED_PREFIX:
      groups[tuple(row.tokens[:len(row.tokens) - row.scored])].append(i)
    else:
      plain.append(i)
  suffixes = bucket_lengths(buckets[-1], SMALLEST_SUFFIX)
  shared = []
  for prefix, members in groups.items():
    width = bucket_for(max(rows[i].scored for i in members), suffixes)
    fits = len(prefix) + width <= buckets[-1]  # every padded position in the context
    if len(members) > 1 and fits:
      shared.extend((members[s:s + size], width) for s in range(0, len(members), size))
    else:
      plain.extend(members)
  batches = itertools.chain(_plain_batches(devices, rows, plain, size, buckets),
                            _shared_batches(devices, rows, shared, size, buckets))
  for members, (logprob_B, greedy_B) in batches:
    for b, i in enumerate(members):
      results[i] = (float(logprob_B[b]), bool(greedy_B[b]))
    update(len(members))
  return results


def _plain_batches(devices, rows, indices, size, buckets) -> Iterator[tuple[list[int], Scores]]:
  by_bucket: dict[int, list[int]] = defaultdict(list)
  for i in indices:
    by_bucket[bucket_for(len(rows[i].tokens), buckets)].append(i)
  for bucket in sorted(by_bucket, reverse=True):
    order = sorted(by_bucket[bucket], key=lambda i: -len(rows[i].tokens))
    for start in range(0, len(order), size):
      members = order[start:start + size]
      tokens_BxT, targets_BxT, scored_BxT = _empty(size, bucket)
      for b, i in enumerate(members):
        row, length = rows[i], len(rows[i].tokens)
        tokens_BxT[b, :length] = row.tokens
        targets_BxT[b, :length] = row.targets
        scored_BxT[b, length - row.scored:length] = True
      yield members, devices.score(tokens_BxT, targets_BxT, scored_BxT)


def _shared_batches(devices, rows, groups, size, buckets
                    ) -> Iterator[tuple[list[int], Scores]]:
  """Batches of `size` rows and up to size / 4 groups (whole; each with its suffix bucket),
  by (prefix bucket, suffix bucket), longest prefix first."""
  prefixes = max(devices.split, size // 4 // devices.split * devices.split)
  by_shape: dict[tuple[int, int], list[list[int]]] = defaultdict(list)
  for members, width in groups:
    row = rows[members[0]]
    by_shape[bucket_for(len(row.tokens) - row.scored, buckets), width].append(members)
  for (length, width), chunks in sorted(by_shape.items(), reverse=True):
    chunks.sort(key=lambda members: rows[members[0]].scored - len(rows[members[0]].tokens))
    batch: list[list[int]] = []
    for chunk in chunks + [None]:  # None: the end, flushing the last batch
      if batch and (chunk is None or len(batch) == prefixes
                    or sum(map(len, batch)) + len(chunk) > size):
        yield [i for members in batch for i in members], _shared_arrays(
            devices, rows, batch, size, prefixes, length, width)
        batch = []
      if chunk is not None:
        batch.append(chunk)


def _shared_arrays(devices, rows, batch, size, prefixes, length, width) -> Scores:
  prefix_GxP = np.zeros((prefixes, length), np.int32)
  group_R, offset_R = np.zeros(size, np.int32), np.zeros(size, np.int32)
  tokens_RxQ, targets_RxQ, scored_RxQ = _empty(size, width)
  r = 0
  for g, members in enumerate(batch):
    first = rows[members[0]]
    prefix = len(first.tokens) - first.scored
    prefix_GxP[g, :prefix] = first.tokens[:prefix]
    for i in members:
      row = rows[i]
      group_R[r], offset_R[r] = g, prefix
      tokens_RxQ[r, :row.scored] = row.tokens[prefix:]
      targets_RxQ[r, :row.scored] = row.targets[prefix:]
      scored_RxQ[r, :row.scored] = True
      r += 1
  return devices.score_shared(prefix_GxP, group_R, offset_R, tokens_RxQ, targets_RxQ,
                              scored_RxQ)


def _empty(rows: int, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  return (np.zeros((rows, length), np.int32), np.zeros((rows, length), np.int32),
          np.zeros((rows, length), bool))


def _row_sums(logits_BxTxV, targets_BxT, scored_BxT) -> dict[str, jax.Array]:
  """Per row: the sum of the scored targets' log-probabilities (float32 at least) and whether
  every scored target is the argmax, over the model's whole output as lm_eval's `hf` model
  takes them (ids past the tokenizer's, a padded vocabulary's, included)."""
  logits_BxTxV = logits_BxTxV.astype(jnp.promote_types(logits_BxTxV.dtype, jnp.float32))
  target_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
  logprob_BxT = target_BxT - jax.nn.logsumexp(logits_BxTxV, axis=-1)
  greedy_BxT = jnp.argmax(logits_BxTxV, axis=-1) == targets_BxT
  return {"logprob": jnp.sum(jnp.where(scored_BxT, logprob_BxT, 0.0), axis=-1),
          "greedy": jnp.all(greedy_BxT | ~scored_BxT, axis=-1)}


def _score_step(params: Any, batch: dict[str, jax.Array], *, model: GPT
                ) -> dict[str, jax.Array]:
  """_row_sums of whole rows."""
  logits_BxTxV = model.apply({"params": params}, batch["tokens"])
  return _row_sums(logits_BxTxV, batch["targets"], batch["scored"])


def _shared_step(params: Any, batch: dict[str, jax.Array], *, model: GPT
                 ) -> dict[str, jax.Array]:
  """_row_sums of rows after shared prefixes: the G prefixes (GxP, padded on the right) fill
  a KV cache once; row r reads prefix group[r]'s cache and runs its own Q tokens at the
  positions after it (its padding after its real tokens, so no real token reads it)."""
  variables = {"params": params}
  prefix_GxP, tokens_RxQ = batch["prefix"], batch["tokens"]
  (groups, length), width = prefix_GxP.shape, tokens_RxQ.shape[1]
  cache = init_cache(model.config, groups, length + width)
  positions_GxP = jnp.broadcast_to(jnp.arange(length), prefix_GxP.shape)
  _, cache = model.apply(variables, prefix_GxP, positions_GxP, cache, method=GPT.encode)
  axis = 1 if model.config.scan_layers else 0  # a stacked cache is LxBx...
  cache = jax.tree.map(lambda x: jnp.take(x, batch["group"], axis=axis), cache)
  positions_RxQ = batch["offset"][:, None] + jnp.arange(width)[None, :]
  hidden_RxQxD, _ = model.apply(variables, tokens_RxQ, positions_RxQ, cache, method=GPT.encode)
  logits_RxQxV = model.apply(variables, hidden_RxQxD, method=GPT.logits)
  return _row_sums(logits_RxQxV, batch["targets"], batch["scored"])


class Devices:
  """The device side: batches of fixed shapes through jitted programs on the mesh.

  On process 0 (or the only process) `score` and `generate` run a batch and `stop` ends the
  other processes' `serve`. With several processes each call first broadcasts a header
  (int32 [kind, rows, length, max_new_tokens, top_k, seed] and float32 [temperature, top_p])
  and then the batch's arrays, and every process runs the same program on them.
  """

  def __init__(self, model: GPT, params: Any, param_shardings: Any, mesh, rules,
               vocab_size: int, eot_id: int):
    self.model, self.params, self.mesh, self.rules = model, params, mesh, rules
    self.vocab_size, self.eot_id = vocab_size, eot_id
    self._score, self._shared = (sharding.jit_eval_step(
        functools.partial(step, model=model), param_shardings, mesh, rules)
        for step in (_score_step, _shared_step))
    self.split = sharding.data_parallel_size(mesh, rules)
    self._rows = sharding.batch_sharding(mesh, rules, 0, ndim=2)
    self._rows_1d = sharding.batch_sharding(mesh, rules, 0, ndim=1)
    self._replicated = sharding.replicated(mesh)
    # A random key on every device of the mesh (device_put can't reach another process's).
    self._key = jax.jit(jax.random.key, out_shardings=self._replicated)
    # The (program, shape, settings) of every batch run: one compile each.
    self.shapes: set[tuple] = set()

  @property
  def multiprocess(self) -> bool:
    return jax.process_count() > 1

  def _send(self, header: np.ndarray, settings: np.ndarray, arrays: dict[str, np.ndarray]):
    """Process 0's batch, on every process as the others receive it in `serve`."""
    if not self.multiprocess:
      return header, settings, arrays
    header, settings = (np.asarray(x) for x in multihost_utils.broadcast_one_to_all(
        (header, settings)))
    if arrays:
      arrays = {k: np.asarray(v) for k, v in multihost_utils.broadcast_one_to_all(arrays).items()}
    return header, settings, arrays

  def _place_rows(self, array: np.ndarray) -> jax.Array:
    placement = self._rows if array.ndim == 2 else self._rows_1d
    rows = multihost.process_rows(placement, array.shape, axis=0)
    return multihost.global_array(array[rows], placement, array.shape)

  def score(self, tokens_BxT: np.ndarray, targets_BxT: np.ndarray, scored_BxT: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:
    """(sum of log-probabilities, all greedy) of each row."""
    header = np.array([_SCORE, *tokens_BxT.shape, 0, 0, 0], np.int32)
    _, _, arrays = self._send(header, np.zeros(2, np.float32),
                              {"tokens": tokens_BxT, "targets": targets_BxT,
                               "scored": scored_BxT})
    return self._run_score(arrays)

  def score_shared(self, prefix_GxP: np.ndarray, group_R: np.ndarray, offset_R: np.ndarray,
                   tokens_RxQ: np.ndarray, targets_RxQ: np.ndarray, scored_RxQ: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(sum of log-probabilities, all greedy) of each row after its prefix (_shared_step)."""
    header = np.array([_SHARED, *tokens_RxQ.shape, *prefix_GxP.shape, 0], np.int32)
    _, _, arrays = self._send(header, np.zeros(2, np.float32), {
        "prefix": prefix_GxP, "group": group_R, "offset": offset_R, "tokens": tokens_RxQ,
        "targets": targets_RxQ, "scored": scored_RxQ})
    return self._run_score(arrays)

  def _run_score(self, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    shared = "prefix" in arrays
    self.shapes.add(("shared", *arrays["prefix"].shape, *arrays["tokens"].shape) if shared
                    else ("score", *arrays["tokens"].shape))
    step = self._shared if shared else self._score
    out = step(self.params, {k: self._place_rows(v) for k, v in arrays.items()})
    return np.asarray(out["logprob"]), np.asarray(out["greedy"])  # replicated

  def generate(self, tokens_BxP: np.ndarray, lengths_B: np.ndarray, max_new_tokens: int,
               temperature: float, top_k: int, top_p: float, seed: int) -> list[list[int]]:
    """New tokens of each row (generate_lib's cached decoding, stopping at end-of-text)."""
    header = np.array([_GENERATE, *tokens_BxP.shape, max_new_tokens, top_k, seed], np.int32)
    settings = np.array([temperature, top_p], np.float32)
    header, settings, arrays = self._send(header, settings,
                                          {"tokens": tokens_BxP, "lengths": lengths_B})
    if not self.multiprocess:  # the float64 values as given, not their float32 roundings
      settings = (temperature, top_p)
    return self._run_generate(header, settings, arrays)

  def _run_generate(self, header, settings, arrays) -> list[list[int]]:
    _, _, _, max_new_tokens, top_k, seed = (int(x) for x in header)
    temperature, top_p = (float(x) for x in settings)
    self.shapes.add(("generate", *arrays["tokens"].shape, max_new_tokens, temperature, top_k,
                     top_p))

    def replicated(x):
      return multihost.global_array(np.asarray(x), self._replicated, np.shape(x))

    out_BxN = generate_lib._generate_cached(
        self.model, self.params, replicated(arrays["tokens"]), replicated(arrays["lengths"]),
        self._key(np.int32(seed)), max_new_tokens=max_new_tokens,
        temperature=temperature, top_k=top_k, top_p=top_p, eot_id=self.eot_id,
        vocab_size=self.vocab_size)
    return generate_lib._trim(np.asarray(multihost.host_copy(out_BxN)))

  def stop(self) -> None:
    """Ends the other processes' `serve` (nothing to do with one process)."""
    if self.multiprocess:
      self._send(np.zeros(6, np.int32), np.zeros(2, np.float32), {})

  def serve(self) -> None:
    """Processes other than 0: run each batch process 0 sends until it says stop."""
    while True:
      header, settings = (np.asarray(x) for x in multihost_utils.broadcast_one_to_all(
          (np.zeros(6, np.int32), np.zeros(2, np.float32))))
      kind, rows, length = (int(x) for x in header[:3])
      if kind == _STOP:
        return
      if kind in (_SCORE, _SHARED):
        shapes = {"tokens": np.int32, "targets": np.int32, "scored": bool}
        zeros = {k: np.zeros((rows, length), dtype) for k, dtype in shapes.items()}
        if kind == _SHARED:
          zeros.update(prefix=np.zeros(tuple(header[3:5]), np.int32),
                       group=np.zeros(rows, np.int32), offset=np.zeros(rows, np.int32))
      else:
        zeros = {"tokens": np.zeros((rows, length), np.int32),
                 "lengths": np.zeros(rows, np.int32)}
      arrays = {k: np.asarray(v) for k, v in multihost_utils.broadcast_one_to_all(zeros).items()}
      if kind in (_SCORE, _SHARED):
        self._run_score(arrays)
      else:
        self._run_generate(header, settings, arrays)
