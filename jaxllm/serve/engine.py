"""The serving engine: continuous batching over a fixed set of slots sharing one KV cache.

As JetStream and jax-llm-examples' serving loops do it: `slots` rows of one KV cache, one per
live request. A request waits in a queue until a slot is free; it is then prefilled alone
(its prompt padded to one of a few bucket lengths, so the set of compiled programs is fixed
after warm-up), its keys and values written into the free slot, and its first token sampled.
One jitted step then decodes a token for every slot at once (the cache donated), each at its
own position; requests join and leave between steps. Rows never mix: a request's greedy
output is the same whatever else is in the batch. Past the context length, a request goes on
as `jaxllm generate` does: each further token is computed from its last context_length tokens,
re-run as a window.

One background thread runs the loop; `submit` may be called from any thread and reports to a
callback, called on the engine's thread, once per step of its request (`Delta`).

Shapes are in the names: S slots, P padded prompt length, V vocabulary, K top alternatives.
"""

from __future__ import annotations

import collections
import math
import sys
import threading
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import prometheus_client
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxllm.data.tokenizer import Tokenizer
from jaxllm.errors import JaxllmError
from jaxllm.models.gpt import GPT, init_cache, logical_axes
from jaxllm.serve import programs
from jaxllm.serve import requests as requests_lib
from jaxllm.serve.metrics import EngineMetrics
from jaxllm.serve.requests import MAX_TOP_LOGPROBS, Delta, Handle, QueueFull, Sampling, _Request


class Engine:
  """Continuous batching of generation requests over `slots` rows of one KV cache."""

  def __init__(self, model: GPT, params: Any, tokenizer: Tokenizer, *, slots: int = 8,
               max_queue: int = 64, buckets: Sequence[int] | None = None,
               mesh: Mesh | None = None, rules: Sequence[tuple[str, Any]] = (),
               registry: prometheus_client.CollectorRegistry | None = None):
    if slots < 1:
      raise JaxllmError(f"--slots must be at least 1, got {slots}")
    if max_queue < 0:
      raise JaxllmError(f"--max-queue must be 0 or more, got {max_queue}")
    self.model, self.params, self.tokenizer = model, params, tokenizer
    self.context_length = model.config.context_length
    self.slots, self.max_queue = slots, max_queue
    self.buckets = tuple(buckets or programs.prefill_buckets(self.context_length))
    self.row_buckets = programs.row_buckets(slots)
    self.vocab_size = min(tokenizer.vocab_size, model.config.vocab_size)
    self._cache = init_cache(model.config, slots, self.context_length)
    self.mesh, self.rules = mesh, tuple(rules)
    if mesh is not None:  # training's shardings: parameters by their logical axes, the cache's
      # slots over the batch axes and its kv heads over `tensor`
      self.params = jax.device_put(params, nn.logical_to_mesh_sharding(
          logical_axes(model), mesh, self.rules))
      cache_shardings = jax.tree.map(self._cache_sharding, self._cache)
      leaf, where = jax.tree.leaves(self._cache)[0], jax.tree.leaves(cache_shardings)[0]
      axes = where.spec[programs.batch_axis(leaf)] or ()
      split = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
      if slots % split:
        raise JaxllmError(f"--slots {slots} does not split over the mesh's batch axes "
                          f"({split} ways); use a multiple of {split}")
      self._cache = jax.device_put(self._cache, cache_shardings)
    self._live: list[_Request | None] = [None] * slots
    self._positions = np.zeros(slots, np.int32)  # where each slot's next token goes
    self._waiting: collections.deque[_Request] = collections.deque()
    self._wake = threading.Condition()
    self._seeds = np.random.default_rng()
    self._thread: threading.Thread | None = None
    self._stopping = False
    self._failure: BaseException | None = None
    self.metrics = EngineMetrics(registry or prometheus_client.CollectorRegistry(), slots)
    self.registry = self.metrics.registry

  def _cache_sharding(self, leaf: jax.Array) -> NamedSharding:
    axes = ("batch", "sequence", "kv_heads", "kv")
    spec = P(*(("layers",) if leaf.ndim == 5 else ()), *axes)
    return nn.logical_to_mesh_sharding(spec, self.mesh, self.rules)

  def _compiled(self, fn, *args, **static):
    """Calls a compiled program, traced (once) under the mesh's logical-axis rules."""
    if self.mesh is None:
      return fn(self.model, self.params, *args, **static)
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return fn(self.model, self.params, *args, **static)

  # -- the public side: any thread ---------------------------------------------------------

  def start(self) -> "Engine":
    """Starts the decode loop on its own thread (idempotent)."""
    if self._thread is None:
      self._thread = threading.Thread(target=self._loop, name="jaxllm-engine", daemon=True)
      self._thread.start()
    return self

  def close(self) -> None:
    """Stops the loop after its current step; requests still queued or decoding end with an
    error delta."""
    with self._wake:
      self._stopping = True
      self._wake.notify_all()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    else:
      self._fail_all(JaxllmError("the engine was closed before it started"))

  def is_running(self) -> bool:
    """Whether the decode loop's thread is alive: what a server's health check reports."""
    return self._thread is not None and self._thread.is_alive()

  def check(self, prompt: Sequence[int], sampling: Sampling) -> None:
    """A JaxllmError naming what is wrong with a request, before it is queued."""
    if len(prompt) == 0:
      raise JaxllmError("the prompt is empty (generation needs at least one token)")
    if min(prompt) < 0 or max(prompt) >= self.vocab_size:
      raise JaxllmError(f"the prompt has token ids outside [0, {self.vocab_size})")
    if len(prompt) > self.context_length:
      raise JaxllmError(f"the prompt has {len(prompt)} tokens, more than the model's context "
                        f"length {self.context_length}; shorten it")
    if sampling.max_tokens < 0:
      raise JaxllmError(f"max_tokens must be 0 or more, got {sampling.max_tokens}")
    if sampling.temperature < 0:
      raise JaxllmError(f"temperature must be 0 or more, got {sampling.temperature}")
    if not 0.0 < sampling.top_p <= 1.0:
      raise JaxllmError(f"top_p must be in (0, 1], got {sampling.top_p}")
    if not 0 <= sampling.top_k < 2**31:
      raise JaxllmError(f"top_k must be 0 (off) or more, below 2**31, got {sampling.top_k}")
    if sampling.seed is not None and not 0 <= sampling.seed < 2**32:
      raise JaxllmError(f"seed must be in [0, 2**32), got {sampling.seed}")
    if sampling.logprobs is not None and not 0 <= sampling.logprobs <= MAX_TOP_LOGPROBS:
      raise JaxllmError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {sampling.logprobs}")
    if any(not stop for stop in sampling.stop):
      raise JaxllmError("a stop string is empty")

  def submit(self, prompt: Sequence[int], sampling: Sampling,
             on_delta: Callable[[Delta], None]) -> Handle:
    """Queues a request; `on_delta` hears of each step, the last with its finish reason.
    Raises JaxllmError for a bad request and QueueFull when `max_queue` requests wait."""
    self.check(prompt, sampling)
    if self._failure is not None:
      raise JaxllmError(f"the engine has stopped: {self._failure}")
    seed = sampling.seed if sampling.seed is not None else int(self._seeds.integers(2**31))
    request = _Request(list(map(int, prompt)), sampling, on_delta, seed, time.perf_counter())
    if sampling.max_tokens == 0:  # nothing to decode: the prompt alone (echo, scoring)
      on_delta(Delta("", [], [], [], "length", len(prompt), 0))
      return Handle(request)
    with self._wake:
      if self._stopping:
        raise JaxllmError("the engine is shutting down")
      free = sum(r is None for r in self._live)
      if len(self._waiting) >= self.max_queue + free:
        raise QueueFull(f"{len(self._waiting)} requests are waiting already (--max-queue "
                        f"{self.max_queue}); try again later")
      self._waiting.append(request)
      self.metrics.waiting.set(len(self._waiting))
      self._wake.notify_all()
    return Handle(request)

  def complete(self, prompt: Sequence[int], sampling: Sampling, timeout: float | None = None
               ) -> Delta:
    """Submits a request and waits for it: one Delta holding all of it."""
    done, parts = threading.Event(), []

    def on_delta(delta: Delta) -> None:
      parts.append(delta)
      if delta.finish_reason or delta.error:
        done.set()

    self.submit(prompt, sampling, on_delta)
    if not done.wait(timeout):
      raise TimeoutError(f"no answer within {timeout} s")
    last = parts[-1]
    if last.error:
      raise JaxllmError(last.error)
    return Delta("".join(d.text for d in parts), [t for d in parts for t in d.token_ids],
                 [x for d in parts for x in d.logprobs],
                 [x for d in parts for x in d.top_logprobs], last.finish_reason,
                 last.prompt_tokens, last.completion_tokens)

  def prompt_logprobs(self, prompt: Sequence[int], top: int = 0
                      ) -> tuple[list[float | None], list[list[tuple[int, float]]]]:
    """Each prompt token's logprob given the ones before it (None for the first) and its
    `top` most likely alternatives: what `echo` with `logprobs` reports."""
    self.check(prompt, Sampling())
    length = len(prompt)
    bucket = self._bucket(length)
    tokens_1xP = np.zeros((1, bucket), np.int32)
    tokens_1xP[0, :length] = prompt
    lp_P, top_lp_PxK, top_ids_PxK = (np.asarray(x) for x in self._compiled(
        programs.score, jnp.asarray(tokens_1xP), vocab_size=self.vocab_size, top=top))
    logprobs = [None] + [float(x) for x in lp_P[:length - 1]]
    tops = [[]] + [list(zip(map(int, ids[:top]), map(float, lps[:top])))
                   for ids, lps in zip(top_ids_PxK[:length - 1], top_lp_PxK[:length - 1])]
    return logprobs, tops

  def warm_up(self) -> None:
    """Compiles every program now, not on the first requests: each prefill bucket, the window
    past the context, and the decode step over each bucket of slots (that many requests at
    once: new requests take the lowest free slots)."""
    for bucket in self.buckets:
      self.complete([0] * min(bucket, self.context_length), Sampling(max_tokens=2, temperature=0))
    for rows in self.row_buckets:
      done = threading.Semaphore(0)
      with self._wake:  # queued together: admitted together, into slots 0 .. rows - 1
        for _ in range(rows):
          self._waiting.append(_Request([0], Sampling(max_tokens=3, temperature=0,
                                                      ignore_eos=True),
                                        lambda d: (d.finish_reason or d.error) and done.release(),
                                        0, time.perf_counter()))
        self._wake.notify_all()
      for _ in range(rows):
        done.acquire()

  def stats(self) -> dict[str, int]:
    with self._wake:
      live = sum(r is not None for r in self._live)
      return {"slots": self.slots, "running": live, "waiting": len(self._waiting)}

  # -- the loop: the engine's thread --------------------------------------------------------

  def _bucket(self, length: int) -> int:
    return next(b for b in self.buckets if b >= length)

  def _loop(self) -> None:
    try:
      while True:
        with self._wake:
          while not (self._stopping or self._waiting or any(self._live)):
            self._wake.wait()
          if self._stopping:
            break
          admitted = []
          while self._waiting and None in self._live:
            slot = self._live.index(None)
            self._live[slot] = self._waiting.popleft()
            admitted.append(slot)
          self.metrics.waiting.set(len(self._waiting))
        for slot in admitted:
          self._prefill(slot)
        self._drop_cancelled()
        if any(self._live):
          self._decode()
        self._publish()
    except BaseException as e:  # noqa: BLE001 - every request hears of it, then it propagates
      self._failure = e
      raise
    finally:
      self._fail_all(self._failure or JaxllmError("the engine was closed"))

  def _publish(self) -> None:
    live = sum(r is not None for r in self._live)
    self.metrics.running.set(live)
    self.metrics.slots_used.set(live)

  def _fail_all(self, error: BaseException) -> None:
    with self._wake:
      requests = [r for r in self._live if r is not None] + list(self._waiting)
      self._live = [None] * self.slots
      self._waiting.clear()
    for request in requests:
      if not request.cancelled:
        _tell(request, Delta("", [], [], [], None, len(request.prompt), len(request.tokens),
                               error=f"{type(error).__name__}: {error}"))

  def _drop_cancelled(self) -> None:
    for slot, request in enumerate(self._live):
      if request is not None and request.cancelled:
        self._free(slot)

  def _free(self, slot: int) -> None:
    with self._wake:
      self._live[slot] = None

  def _sampling_args(self, requests: Sequence[_Request | None]) -> tuple[jax.Array, ...]:
    def column(get, dtype):
      return jnp.asarray(np.array([get(r) if r is not None else 0 for r in requests], dtype))
    return (column(lambda r: r.seed, np.uint32), column(lambda r: len(r.tokens), np.int32),
            column(lambda r: r.sampling.temperature, np.float32),
            column(lambda r: r.sampling.top_k, np.int32),
            column(lambda r: r.sampling.top_p if r is not None else 1.0, np.float32))

  def _top(self, requests: Sequence[_Request | None]) -> int:
    wanted = any(r is not None and r.sampling.logprobs is not None for r in requests)
    return MAX_TOP_LOGPROBS if wanted else 0

  def _prefill(self, slot: int) -> None:
    request = self._live[slot]
    length = len(request.prompt)
    tokens_1xP = np.zeros((1, self._bucket(length)), np.int32)
    tokens_1xP[0, :length] = request.prompt
    self.metrics.prompt_tokens.inc(length)
    self._cache, *sampled = self._compiled(
        programs.prefill, self._cache, jnp.asarray(tokens_1xP), jnp.int32(length),
        jnp.int32(slot), *self._sampling_args([request]), vocab_size=self.vocab_size,
        top=self._top([request]))
    self._advance(slot, *(np.asarray(x)[0] for x in sampled))

  def _decode(self) -> None:
    """One token for every live slot: the batched step for those inside the context, a
    window re-run for each past it."""
    requests = list(self._live)
    tokens_S = np.zeros(self.slots, np.int32)
    positions_S = np.zeros(self.slots, np.int32)
    windowed = []
    for slot, request in enumerate(requests):
      if request is None:
        continue
      position = len(request.prompt) + len(request.tokens) - 1  # of the token fed in
      if position >= self.context_length:
        windowed.append(slot)
        requests[slot] = None
        continue
      tokens_S[slot], positions_S[slot] = request.tokens[-1], position
    if any(requests):  # over the first R slots, R a bucket holding the last live one
      last = max(slot for slot, request in enumerate(requests) if request is not None)
      rows = next(r for r in self.row_buckets if r > last)
      self._cache, *sampled = self._compiled(
          programs.decode, self._cache, jnp.asarray(tokens_S[:rows]),
          jnp.asarray(positions_S[:rows]), *self._sampling_args(requests[:rows]),
          vocab_size=self.vocab_size, top=self._top(requests))
      sampled = [np.asarray(x) for x in sampled]
      for slot, request in enumerate(requests[:rows]):
        if request is not None:
          self._advance(slot, *(x[slot] for x in sampled))
    for slot in windowed:
      request = self._live[slot]
      window_1xC = np.array([(request.prompt + request.tokens)[-self.context_length:]], np.int32)
      sampled = self._compiled(programs.window, jnp.asarray(window_1xC),
                               *self._sampling_args([request]), vocab_size=self.vocab_size,
                               top=self._top([request]))
      self._advance(slot, *(np.asarray(x)[0] for x in sampled))

  def _advance(self, slot: int, token: np.ndarray, logprob: np.ndarray, top_ids_K: np.ndarray,
               top_lp_K: np.ndarray) -> None:
    """Records a slot's new token, reports it, and frees the slot when the request ends."""
    request, token = self._live[slot], int(token)
    now = time.perf_counter()
    if request.tokens:
      self.metrics.tpot.observe(now - request.last_token_time)
    else:
      self.metrics.ttft.observe(now - request.submitted)
    request.last_token_time = now
    request.tokens.append(token)
    self.metrics.generated_tokens.inc()
    sampling = request.sampling
    eos = token == self.tokenizer.eot_id and not sampling.ignore_eos
    text = self.tokenizer.decode(request.tokens[:-1] if eos else request.tokens)
    finish = "stop" if eos else None
    hits = [i for i in (text.find(stop, request.emitted) for stop in sampling.stop) if i >= 0]
    if hits:
      text, finish = text[:min(hits)], "stop"
    if finish is None and len(request.tokens) >= sampling.max_tokens:
      finish = "length"
    safe = len(text) if finish else len(text) - requests_lib.held_back(text, sampling.stop)
    delta = Delta(text[request.emitted:safe], [token], [], [], finish, len(request.prompt),
                  len(request.tokens))
    request.emitted = max(request.emitted, safe)
    if sampling.logprobs is not None:
      delta.logprobs = [float(logprob)]
      k = sampling.logprobs
      delta.top_logprobs = [list(zip(map(int, top_ids_K[:k]), map(float, top_lp_K[:k])))]
    if finish:
      request.finished = True
      self.metrics.finished.labels(finish).inc()
      self._free(slot)
    if not request.cancelled:
      _tell(request, delta)


def _tell(request: _Request, delta: Delta) -> None:
  """Reports a step to its request; a callback that fails cancels its request alone."""
  try:
    request.on_delta(delta)
  except Exception as e:  # noqa: BLE001 - the loop serves every other request on
    request.cancelled = True
    print(f"jaxllm serve: a request's callback failed ({type(e).__name__}: {e}); it is "
          f"cancelled", file=sys.stderr, flush=True)
