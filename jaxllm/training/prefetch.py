"""Training batches made ahead of the step that needs them, by a background thread.

`make(step)` (cut the batch on the host, place it on the devices) runs up to `depth` steps
ahead, so while the devices compute step k the host prepares k+1, k+2, ... Batches stay a
pure function of the step, so a resumed run sees the same ones. `depth=0` makes each batch
when it is asked for, in the caller's thread: no overlap, the same batches.

The time `get` takes is the time the training loop waits for data: with depth 0, all the
host's work on a batch; with prefetching, only what the thread did not finish ahead.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable


class Prefetcher:
  """`get(step)` for step = start, start + 1, ..., stop - 1, in that order."""

  def __init__(self, make: Callable[[int], Any], start: int, stop: int, depth: int):
    self._make, self._next, self.depth = make, start, depth
    self._stop = threading.Event()
    if depth > 0:
      self._queue: queue.Queue = queue.Queue(maxsize=depth)
      self._thread = threading.Thread(target=self._produce, args=(start, stop), daemon=True,
                                      name="jaxllm-prefetch")
      self._thread.start()

  def _produce(self, start: int, stop: int) -> None:
    for step in range(start, stop):
      try:
        item = (step, self._make(step), None)
      except BaseException as e:  # raised in the training loop, at the step it belongs to
        item = (step, None, e)
      while not self._stop.is_set():
        try:
          self._queue.put(item, timeout=0.1)
          break
        except queue.Full:
          continue
      if self._stop.is_set() or item[2] is not None:
        return

  def get(self, step: int) -> Any:
    if step != self._next:
      raise ValueError(f"batches are prefetched in order: expected step {self._next}, got {step}")
    self._next += 1
    if self.depth <= 0:
      return self._make(step)
    made_step, batch, error = self._queue.get()
    if error is not None:
      raise error
    assert made_step == step, (made_step, step)
    return batch

  def close(self) -> None:
    """Stop making batches (those made are dropped)."""
    self._stop.set()
    if self.depth > 0:
      self._thread.join()

  def __enter__(self) -> "Prefetcher":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
