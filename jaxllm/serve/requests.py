"""A generation request as the serving engine sees it: how it is sampled (`Sampling`), what
each step reports (`Delta`), and the handle that cancels it."""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from jaxllm.errors import JaxllmError

# The most alternatives a token's logprobs can list (OpenAI's chat API allows 20).
MAX_TOP_LOGPROBS = 20


class QueueFull(JaxllmError):
  """The waiting queue holds `max_queue` requests already; try again later."""


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How one request is decoded. temperature 0 is greedy; top_k 0 and top_p 1 are off."""

  max_tokens: int = 16
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  seed: int | None = None  # None: a fresh one per request
  stop: tuple[str, ...] = ()  # finish before the first of these strings; it is not returned
  logprobs: int | None = None  # None: none; K: each token's logprob and its K top alternatives
  ignore_eos: bool = False  # go on past the end-of-text token (benchmarks)


@dataclasses.dataclass
class Delta:
  """What one step of a request produced: its new tokens, the text they complete (text is held
  back while it may be the start of a stop string or of a multi-byte character), and at the
  end its finish reason and exact token counts."""

  text: str
  token_ids: list[int]
  logprobs: list[float]  # per token in token_ids, when Sampling.logprobs is set
  top_logprobs: list[list[tuple[int, float]]]  # per token: its K most likely (id, logprob)
  finish_reason: str | None = None  # "stop" (end of text or a stop string) or "length"
  prompt_tokens: int = 0
  completion_tokens: int = 0  # every token sampled, the end-of-text token included
  error: str | None = None  # the engine failed; the request ends here


@dataclasses.dataclass
class _Request:
  prompt: list[int]
  sampling: Sampling
  on_delta: Callable[[Delta], None]
  seed: int
  submitted: float
  tokens: list[int] = dataclasses.field(default_factory=list)  # generated so far
  emitted: int = 0  # characters of the decoded text already reported
  last_token_time: float = 0.0
  cancelled: bool = False
  finished: bool = False


class Handle:
  """A submitted request: `cancel()` frees its slot at the next step (a client went away)."""

  def __init__(self, request: _Request):
    self._request = request

  def cancel(self) -> None:
    self._request.cancelled = True


def held_back(text: str, stops: Sequence[str]) -> int:
  """How many trailing characters to hold: an unfinished multi-byte character (decoded as
  U+FFFD) or the longest end of the text that a stop string starts with."""
  held = len(text) - len(text.rstrip("\ufffd"))
  body = text[:len(text) - held]
  longest = 0
  for stop in stops:
    for k in range(min(len(stop) - 1, len(body)), longest, -1):
      if body.endswith(stop[:k]):
        longest = k
        break
  return held + longest
