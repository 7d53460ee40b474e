"""One HTTP request's engine requests, as the event loop sees them: their Deltas carried from
the engine's thread onto an asyncio queue, merged into whole choices, or sent as server-sent
events; cancelled however the HTTP request ends."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import AsyncIterator, Callable, Sequence

import fastapi
from fastapi.responses import StreamingResponse

from jaxllm.serve import protocol
from jaxllm.serve.engine import Delta, Engine, Sampling


class Requests:
  """The engine requests of one HTTP request, their Deltas delivered to the event loop as
  (choice index, Delta) on one queue."""

  def __init__(self, engine: Engine, jobs: Sequence[tuple[list[int], Sampling]]):
    loop = asyncio.get_running_loop()
    self.queue: asyncio.Queue[tuple[int, Delta]] = asyncio.Queue()
    self.handles, self.open = [], len(jobs)
    try:
      for index, (ids, sampling) in enumerate(jobs):
        self.handles.append(engine.submit(ids, sampling, self._reporter(loop, index)))
    except BaseException:  # QueueFull half-way: the ones queued already go too
      self.cancel()
      raise

  def _reporter(self, loop: asyncio.AbstractEventLoop, index: int) -> Callable[[Delta], None]:
    def report(delta: Delta) -> None:  # on the engine's thread: it must never raise
      with contextlib.suppress(RuntimeError):  # the loop has closed (shutdown): nobody listens
        loop.call_soon_threadsafe(self.queue.put_nowait, (index, delta))
    return report

  def cancel(self) -> None:
    for handle in self.handles:
      handle.cancel()

  async def deltas(self, request: fastapi.Request | None = None
                   ) -> AsyncIterator[tuple[int, Delta]]:
    """(index, Delta) until every choice finished; an engine failure is a 500. Given the HTTP
    `request`, a client that went away ends it (Starlette notices it for a stream)."""
    while self.open:
      try:
        index, delta = await asyncio.wait_for(self.queue.get(), timeout=1.0)
      except TimeoutError:
        if request is not None and await request.is_disconnected():
          raise protocol.ApiError(499, "the client went away") from None
        continue
      if delta.error:
        raise protocol.ApiError(500, f"the engine failed: {delta.error}", "server_error")
      self.open -= bool(delta.finish_reason)
      yield index, delta


async def gather(requests: Requests, request: fastapi.Request) -> list[Delta]:
  """Each choice's Deltas merged into one; the engine requests cancelled if it fails."""
  totals = [Delta("", [], [], []) for _ in requests.handles]
  try:
    async for index, delta in requests.deltas(request):
      protocol.merge(totals[index], delta)
  finally:
    requests.cancel()
  return totals


def sse(events: AsyncIterator[dict], requests: Requests) -> StreamingResponse:
  """Server-sent events: `data: {json}` per event, an error as one event, then `data: [DONE]`;
  however it ends (a client gone away too), what the engine still decodes is cancelled."""
  async def lines() -> AsyncIterator[str]:
    try:
      try:
        async for event in events:
          yield f"data: {json.dumps(event)}\n\n"
      except protocol.ApiError as e:
        yield f"data: {json.dumps(e.body)}\n\n"
      yield "data: [DONE]\n\n"
    finally:
      requests.cancel()
  return StreamingResponse(lines(), media_type="text/event-stream")
