"""The prefetching thread: the same batches in the same order, errors at their step."""

from __future__ import annotations

import threading

import pytest

from jaxllm.training.prefetch import Prefetcher


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_batches_come_in_order_and_equal_the_unprefetched_ones(depth):
  made = []

  def make(step):
    made.append((step, threading.current_thread().name))
    return {"step": step, "square": step * step}

  with Prefetcher(make, start=5, stop=12, depth=depth) as batches:
    got = [batches.get(step) for step in range(5, 12)]
  assert got == [{"step": s, "square": s * s} for s in range(5, 12)]
  threads = {name for _, name in made}
  assert threads == ({"jaxllm-prefetch"} if depth else {threading.current_thread().name})
  with Prefetcher(make, 0, 3, depth) as batches, pytest.raises(ValueError, match="in order"):
    batches.get(1)


def test_an_error_making_a_batch_is_raised_at_its_step():
  def make(step):
    if step == 3:
      raise RuntimeError("bad batch 3")
    return step

  with Prefetcher(make, 0, 10, depth=2) as batches:
    assert [batches.get(s) for s in range(3)] == [0, 1, 2]
    with pytest.raises(RuntimeError, match="bad batch 3"):
      batches.get(3)


def test_close_stops_the_thread_while_batches_wait_unclaimed():
  batches = Prefetcher(lambda step: step, 0, 1_000_000, depth=2)
  assert batches.get(0) == 0
  batches.close()
  assert not batches._thread.is_alive()
