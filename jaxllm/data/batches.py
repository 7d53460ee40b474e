"""Token arrays to batches {"inputs": BxL, "targets": BxL} of int32, the targets shifted by one.

Every batch is a pure function of (seed, step): no iterator state to checkpoint, and a run
resumed at step k sees exactly the batches it would have seen. Two ways to pick windows:

- "random" (nanoGPT): step s draws B offsets from a generator seeded by (seed, s).
- "sliding" (the book's GPTDatasetV1): windows start at 0, stride, 2*stride, ... while the
  window and its shifted target fit; each epoch visits them in a permutation seeded by
  (seed, epoch), in full batches (drop_last).

With `microbatches=A` a training batch is AxMxL (M = B / A) for gradient accumulation.
`batch(step, rows=slice(i, j))` gives only rows i..j of it (of each microbatch): in a
multi-host run each process reads just the rows its devices hold.
"""

from __future__ import annotations

from typing import Iterator

import ml_collections
import numpy as np

from jaxllm.errors import JaxllmError

Batch = dict[str, np.ndarray]


def _check(tokens: np.ndarray, batch_size: int, context_length: int,
           microbatches: int | None) -> None:
  if len(tokens) < context_length + 1:
    raise JaxllmError(f"{len(tokens)} tokens are fewer than context_length + 1 = "
                      f"{context_length + 1}; lower model.context_length or use more text")
  if microbatches and batch_size % microbatches:
    raise JaxllmError(f"train.batch_size={batch_size} is not divisible by "
                      f"train.grad_accum={microbatches}")


def gather(tokens: np.ndarray, starts_B: np.ndarray, context_length: int,
           microbatches: int | None = None, rows: slice | None = None) -> Batch:
  """The windows starting at `starts_B` as inputs/targets; AxMxL with `microbatches`.

  With `rows`, only those rows of the batch (of each microbatch) are read.
  """
  starts = starts_B.reshape(microbatches, -1) if microbatches else starts_B
  if rows is not None:
    starts = starts[..., rows]
  chunk = np.asarray(tokens[starts[..., None] + np.arange(context_length + 1)], np.int32)
  return {"inputs": np.ascontiguousarray(chunk[..., :-1]),
          "targets": np.ascontiguousarray(chunk[..., 1:])}


class RandomBatches:
  """nanoGPT's get_batch: uniformly random offsets, fresh for every step."""

  def __init__(self, tokens: np.ndarray, batch_size: int, context_length: int, seed: int,
               microbatches: int | None = None):
    _check(tokens, batch_size, context_length, microbatches)
    self.tokens, self.batch_size, self.context_length = tokens, batch_size, context_length
    self.seed, self.microbatches = seed, microbatches

  def batch(self, step: int, rows: slice | None = None) -> Batch:
    rng = np.random.default_rng((self.seed, step))
    starts_B = rng.integers(0, len(self.tokens) - self.context_length, size=self.batch_size)
    return gather(self.tokens, starts_B, self.context_length, self.microbatches, rows)


def sliding_starts(num_tokens: int, context_length: int, stride: int = 0) -> np.ndarray:
  """The book's window starts: range(0, num_tokens - context_length, stride or context_length)."""
  return np.arange(0, max(num_tokens - context_length, 0), stride or context_length)


class SlidingBatches:
  """The book's shuffled DataLoader over fixed windows, as a function of the step."""

  def __init__(self, tokens: np.ndarray, batch_size: int, context_length: int, stride: int,
               seed: int, microbatches: int | None = None):
    _check(tokens, batch_size, context_length, microbatches)
    self.tokens, self.batch_size, self.context_length = tokens, batch_size, context_length
    self.seed, self.microbatches = seed, microbatches
    self.starts = sliding_starts(len(tokens), context_length, stride)
    self.windows_per_epoch = len(self.starts)
    self.batches_per_epoch = self.windows_per_epoch // batch_size
    if not self.batches_per_epoch:
      raise JaxllmError(
          f"{len(tokens)} training tokens make {self.windows_per_epoch} windows, fewer than "
          f"train.batch_size={batch_size}; lower train.batch_size or data.stride")
    self._epoch, self._order = -1, None

  def batch(self, step: int, rows: slice | None = None) -> Batch:
    epoch, index = divmod(step, self.batches_per_epoch)
    if epoch != self._epoch:  # one permutation per epoch, not per step
      self._epoch = epoch
      self._order = np.random.default_rng((self.seed, epoch)).permutation(self.windows_per_epoch)
    picked = self._order[index * self.batch_size:(index + 1) * self.batch_size]
    return gather(self.tokens, self.starts[picked], self.context_length, self.microbatches, rows)


def _stride(data: ml_collections.ConfigDict) -> int:
  if data.stride < 0:
    raise JaxllmError(f"data.stride must be >= 0 (0 = context_length), got {data.stride}")
  return data.stride


def train_batches(tokens: np.ndarray, data: ml_collections.ConfigDict, batch_size: int,
                  context_length: int, seed: int,
                  microbatches: int | None = None) -> RandomBatches | SlidingBatches:
  """The training batches `data.sampling` asks for; call `.batch(step)`."""
  if data.sampling == "random":
    return RandomBatches(tokens, batch_size, context_length, seed, microbatches)
  if data.sampling == "sliding":
    return SlidingBatches(tokens, batch_size, context_length, _stride(data), seed, microbatches)
  raise JaxllmError(f"data.sampling must be 'random' or 'sliding', got '{data.sampling}'")


def eval_batches(tokens: np.ndarray, data: ml_collections.ConfigDict, batch_size: int,
                 context_length: int, num_batches: int | None, seed: int) -> Iterator[Batch]:
  """Evaluation batches: the same ones on every call, so losses compare across evaluations.

  "sliding": the windows in order, the last batch possibly smaller (the book's validation
  loader), at most `num_batches` batches (None: all). "random": `num_batches` random batches
  drawn from `seed`.
  """
  # Checked here, not at the first next(): a bad config fails where it is passed in.
  if data.sampling == "random":
    if not num_batches:
      raise JaxllmError("random evaluation batches need a count (set train.eval_batches > 0)")
    sampler = RandomBatches(tokens, batch_size, context_length, seed)
    return (sampler.batch(step) for step in range(num_batches))
  if data.sampling == "sliding":
    _check(tokens, batch_size, context_length, None)
    starts = sliding_starts(len(tokens), context_length, _stride(data))
    total = -(-len(starts) // batch_size)
    count = min(total, num_batches) if num_batches else total
    return (gather(tokens, starts[i * batch_size:(i + 1) * batch_size], context_length)
            for i in range(count))
  raise JaxllmError(f"data.sampling must be 'random' or 'sliding', got '{data.sampling}'")


def pad_batch(batch: Batch, batch_size: int) -> Batch:
  """A batch of exactly `batch_size` rows, with "weights" (BxL) 0 on the rows added.

  A short last evaluation batch then keeps the one compiled shape, and still splits evenly
  over the devices that hold batch rows.
  """
  rows = len(batch["inputs"])
  weights_BxL = np.ones(batch["targets"].shape, np.float32)
  padded = {**batch, "weights": weights_BxL}
  return {k: np.concatenate([v, np.zeros((batch_size - rows, *v.shape[1:]), v.dtype)])
          for k, v in padded.items()}
