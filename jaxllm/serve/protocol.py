"""OpenAI's wire format for `jaxllm serve`, as OpenAI's API and vLLM's OpenAI server define it:
the request bodies, the engine's Sampling they ask for, and the JSON of responses, stream
chunks, logprobs, usage and errors. Plain functions over the engine's Deltas; the I/O is in
jaxllm/serve/server.py.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
import uuid
from typing import Any, Sequence

import pydantic

from jaxllm.data.tokenizer import Tokenizer
from jaxllm.errors import JaxllmError
from jaxllm.serve.engine import MAX_TOP_LOGPROBS, Delta, Sampling

# OpenAI's completions API lists at most 5 alternatives per token; its chat API 20.
MAX_COMPLETION_LOGPROBS = 5


class ApiError(Exception):
  """An error answered with an HTTP status and OpenAI's body, {"error": {"message", "type",
  "param", "code"}}."""

  def __init__(self, status: int, message: str, type: str = "invalid_request_error",
               param: str | None = None, code: str | None = None):
    super().__init__(message)
    self.status = status
    self.body = {"error": {"message": message, "type": type, "param": param, "code": code}}


class StreamOptions(pydantic.BaseModel):
  include_usage: bool = False


class RequestBody(pydantic.BaseModel):
  """What both endpoints take. OpenAI's fields jaxllm has no use for (presence_penalty, user,
  ...) are ignored, as vLLM ignores them; top_k and ignore_eos are vLLM's extensions."""

  model: str | None = None
  max_tokens: int | None = None
  temperature: float | None = None  # None: 1
  top_p: float | None = None  # None: 1 (off)
  top_k: int | None = None  # None, 0 or -1: off
  n: int | None = None  # None: 1
  stop: str | list[str] | None = None
  seed: int | None = None
  stream: bool | None = False
  stream_options: StreamOptions | None = None
  ignore_eos: bool = False

  @property
  def include_usage(self) -> bool:
    return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionBody(RequestBody):
  prompt: str | list[str] | list[int] | list[list[int]]
  logprobs: int | None = None
  echo: bool | None = False


class ContentPart(pydantic.BaseModel):
  type: str
  text: str | None = None


class Message(pydantic.BaseModel):
  role: str
  content: str | list[ContentPart] | None = None


class ChatBody(RequestBody):
  messages: list[Message]
  max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
  logprobs: bool | None = False
  top_logprobs: int | None = None


def samplings(body: RequestBody, max_tokens: int, logprobs: int | None,
              stop: Sequence[str] = ()) -> list[Sampling]:
  """One Sampling per choice (`n` of them); with a seed, choice j draws with seed + j, so the
  choices differ and each is reproducible. `stop`: a chat template's end-of-turn strings."""
  n = 1 if body.n is None else body.n
  if n < 1:
    raise JaxllmError(f"n must be at least 1, got {n}")
  stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or ())
  top_k = 0 if body.top_k in (None, -1) else min(body.top_k, 2**31 - 1)  # the engine's int32
  sampling = Sampling(
      max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
      top_p=1.0 if body.top_p is None else body.top_p, top_k=top_k,
      stop=tuple(stops) + tuple(stop), logprobs=logprobs, ignore_eos=body.ignore_eos)
  # The engine draws from a 32-bit seed; any integer maps onto one.
  return [dataclasses.replace(sampling, seed=None if body.seed is None else (body.seed + j) % 2**32)
          for j in range(n)]


def completion_prompts(prompt: Any, tokenizer: Tokenizer) -> list[tuple[list[int], str | None]]:
  """(token ids, text) of each prompt of a completions body: a string, a list of strings, a
  list of token ids (text None: decoded once the ids are checked), or a list of such lists."""
  if isinstance(prompt, str) or (prompt and all(isinstance(t, int) for t in prompt)):
    prompt = [prompt]
  if not prompt:
    raise JaxllmError("prompt is an empty list; give a string, strings or token ids")
  return [(tokenizer.encode(p), p) if isinstance(p, str) else (list(p), None) for p in prompt]


def completion_logprob_count(logprobs: int | None) -> int | None:
  if logprobs is not None and not 0 <= logprobs <= MAX_COMPLETION_LOGPROBS:
    raise JaxllmError(f"logprobs must be in [0, {MAX_COMPLETION_LOGPROBS}], got {logprobs}")
  return logprobs


def chat_logprob_count(body: ChatBody) -> int | None:
  """How many alternatives each token lists, or None for no logprobs (OpenAI's chat rules)."""
  if not body.logprobs:
    if body.top_logprobs:
      raise JaxllmError("top_logprobs needs logprobs: true")
    return None
  top = body.top_logprobs or 0
  if not 0 <= top <= MAX_TOP_LOGPROBS:
    raise JaxllmError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {top}")
  return top


def chat_messages(messages: Sequence[Message]) -> list[dict]:
  """{"role", "content"} dicts for a chat template, content as text (text parts joined by
  newlines, as vLLM joins them)."""
  plain = []
  for message in messages:
    content = message.content or ""
    if not isinstance(content, str):
      if any(part.type != "text" for part in content):
        raise JaxllmError("only text content parts ({\"type\": \"text\"}) can be served")
      content = "\n".join(part.text or "" for part in content)
    plain.append({"role": message.role, "content": content})
  if not plain:
    raise JaxllmError("messages is empty; give at least the user's message")
  return plain


def merge(total: Delta, delta: Delta) -> Delta:
  """`total` (what a request produced so far) with `delta` added."""
  total.text += delta.text
  total.token_ids += delta.token_ids
  total.logprobs += delta.logprobs
  total.top_logprobs += delta.top_logprobs
  total.finish_reason = delta.finish_reason
  total.prompt_tokens, total.completion_tokens = delta.prompt_tokens, delta.completion_tokens
  return total


def usage(finals: Sequence[Delta], n: int) -> dict[str, int]:
  """Token counts of a response whose choice i is finals[i]; a prompt counts once, not once
  per choice (as vLLM counts)."""
  prompt = sum(d.prompt_tokens for d in finals[::n])
  completion = sum(d.completion_tokens for d in finals)
  return {"prompt_tokens": prompt, "completion_tokens": completion,
          "total_tokens": prompt + completion}


def _alternatives(tokenizer: Tokenizer, top: Sequence[tuple[int, float]]):
  # Ids past the tokenizer's vocabulary are masked to -inf, which JSON cannot carry.
  return [(tokenizer.decode([i]), x) for i, x in top if math.isfinite(x)]


def completion_logprobs(tokenizer: Tokenizer, ids: Sequence[int],
                        logprobs: Sequence[float | None],
                        tops: Sequence[Sequence[tuple[int, float]]], offset: int) -> dict:
  """The completions API's `logprobs` of some tokens: their text, their logprobs (None for a
  prompt's first), their top alternatives with the token itself (OpenAI lists up to
  logprobs + 1) and where each token starts in the text, counted from `offset`."""
  tokens = [tokenizer.decode([i]) for i in ids]
  top_logprobs = []
  for token, logprob, top in zip(tokens, logprobs, tops):
    alternatives = None if logprob is None else dict(_alternatives(tokenizer, top))
    if alternatives is not None:
      alternatives.setdefault(token, logprob)
    top_logprobs.append(alternatives)
  return {"tokens": tokens, "token_logprobs": list(logprobs), "top_logprobs": top_logprobs,
          "text_offset": list(itertools.accumulate(map(len, tokens), initial=offset))[:-1]}


def joined_logprobs(first: dict | None, second: dict) -> dict:
  """Two completions `logprobs` objects one after the other (an echoed prompt's, then the
  completion's)."""
  return second if first is None else {key: first[key] + second[key] for key in second}


def chat_logprobs(tokenizer: Tokenizer, ids: Sequence[int], logprobs: Sequence[float],
                  tops: Sequence[Sequence[tuple[int, float]]]) -> dict:
  """The chat API's `logprobs`: {"content": [{token, logprob, bytes, top_logprobs}, ...]}."""
  def entry(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

  return {"content": [
      {**entry(tokenizer.decode([i]), logprob),
       "top_logprobs": [entry(*alternative) for alternative in _alternatives(tokenizer, top)]}
      for i, logprob, top in zip(ids, logprobs, tops)]}


@dataclasses.dataclass
class Envelope:
  """What every body of one response carries: its id, object type, time and model."""

  object: str  # "text_completion", "chat.completion" or "chat.completion.chunk"
  model: str
  include_usage: bool = False  # a stream's chunks carry "usage": null, its last the counts
  id: str = ""
  created: int = dataclasses.field(default_factory=lambda: int(time.time()))

  def __post_init__(self):
    prefix = "cmpl" if self.object == "text_completion" else "chatcmpl"
    self.id = self.id or f"{prefix}-{uuid.uuid4().hex}"

  def body(self, choices: list[dict], **extra) -> dict:
    return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
            "choices": choices, **extra}

  def chunk(self, choice: dict) -> dict:
    return self.body([choice], **({"usage": None} if self.include_usage else {}))
