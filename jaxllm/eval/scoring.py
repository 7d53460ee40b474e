"""Rows of tokens scored, and prompts decoded, in fixed shapes on the mesh: the device side of
jaxllm/eval/harness.py (lm-evaluation-harness in-process), which needs nothing of lm_eval.

Fixed shapes, one compile each: a row (a request, or a window) is padded on the right to the
smallest bucket length holding it (powers of two from 16, and the context length), and rows
go to the devices in batches of exactly the batch size (the last filled with empty rows).
Causal attention keeps the padding out of every real position.

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
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxllm.errors import JaxllmError
from jaxllm.models.gpt import GPT
from jaxllm.serve import generate as generate_lib
from jaxllm.training import multihost, sharding

SMALLEST_BUCKET = 16
# Headers of the batches process 0 sends the others.
_STOP, _SCORE, _GENERATE = 0, 1, 2


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


def _score_step(params: Any, batch: dict[str, jax.Array], *, model: GPT,
                vocab_size: int) -> dict[str, jax.Array]:
  """Per row: the sum of the scored targets' log-probabilities (float32 at least) and whether
  every scored target is the argmax. Ids at or past `vocab_size` (a padded vocabulary) are
  not the model's to predict: they are left out of the softmax, as generation never samples
  them."""
  logits_BxTxV = model.apply({"params": params}, batch["tokens"])
  logits_BxTxV = logits_BxTxV.astype(jnp.promote_types(logits_BxTxV.dtype, jnp.float32))
  if vocab_size < logits_BxTxV.shape[-1]:
    logits_BxTxV = jnp.where(jnp.arange(logits_BxTxV.shape[-1]) < vocab_size, logits_BxTxV,
                             -jnp.inf)
  target_BxT = jnp.take_along_axis(logits_BxTxV, batch["targets"][..., None], axis=-1)[..., 0]
  logprob_BxT = target_BxT - jax.nn.logsumexp(logits_BxTxV, axis=-1)
  scored_BxT = batch["scored"]
  greedy_BxT = jnp.argmax(logits_BxTxV, axis=-1) == batch["targets"]
  return {"logprob": jnp.sum(jnp.where(scored_BxT, logprob_BxT, 0.0), axis=-1),
          "greedy": jnp.all(greedy_BxT | ~scored_BxT, axis=-1)}


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
    self._score = sharding.jit_eval_step(
        functools.partial(_score_step, model=model, vocab_size=vocab_size), param_shardings,
        mesh, rules)
    self._rows = sharding.batch_sharding(mesh, rules, 0, ndim=2)
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
    rows = multihost.process_rows(self._rows, array.shape, axis=0)
    return multihost.global_array(array[rows], self._rows, array.shape)

  def score(self, tokens_BxT: np.ndarray, targets_BxT: np.ndarray, scored_BxT: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:
    """(sum of log-probabilities, all greedy) of each row."""
    header = np.array([_SCORE, *tokens_BxT.shape, 0, 0, 0], np.int32)
    _, _, arrays = self._send(header, np.zeros(2, np.float32),
                              {"tokens": tokens_BxT, "targets": targets_BxT,
                               "scored": scored_BxT})
    return self._run_score(arrays)

  def _run_score(self, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    self.shapes.add(("score", *arrays["tokens"].shape))
    out = self._score(self.params, {k: self._place_rows(v) for k, v in arrays.items()})
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
      if kind == _SCORE:
        shapes = {"tokens": np.int32, "targets": np.int32, "scored": bool}
        zeros = {k: np.zeros((rows, length), dtype) for k, dtype in shapes.items()}
      else:
        zeros = {"tokens": np.zeros((rows, length), np.int32),
                 "lengths": np.zeros(rows, np.int32)}
      arrays = {k: np.asarray(v) for k, v in multihost_utils.broadcast_one_to_all(zeros).items()}
      if kind == _SCORE:
        self._run_score(arrays)
      else:
        self._run_generate(header, settings, arrays)
