"""Instruction models' responses and their judge.

- `generate_responses`: greedy responses to the test prompts written as the book writes them
  (each record + "model_response").
- `judge_responses`: the book's scoring prompt (0-100) sent to an OpenAI-compatible chat
  endpoint, POST {url}/v1/chat/completions, as Ollama and vLLM serve it; off unless
  `judge.url` is set.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from typing import Any, Sequence

import numpy as np

from jaxllm.data import instruction
from jaxllm.data.tokenizer import Tokenizer
from jaxllm.errors import JaxllmError
from jaxllm.models.gpt import GPT
from jaxllm.progress import progress_bar
from jaxllm.serve import generate as generate_lib

RESPONSES_FILE = "instruction-data-with-response.json"  # the book's name for it


# --- Instruction models -------------------------------------------------------------------


def generate_responses(model: GPT, backbone_params: Any, tokenizer: Tokenizer,
                       records: Sequence[dict], *, template: str, max_new_tokens: int,
                       batch_size: int = 16, progress: bool = True) -> list[dict]:
  """Each record + "model_response": a greedy continuation of its prompt up to EOS or
  max_new_tokens (fewer if the context is short), the response marker stripped."""
  prompts = [tokenizer.encode(instruction.format_prompt(r, template)) for r in records]
  responses: list[str] = [""] * len(records)
  order = np.argsort([len(p) for p in prompts], kind="stable")  # similar lengths together
  chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
  with progress_bar(total=len(records), desc="generate", unit="response",
                    disable=not progress) as bar:
    for chunk in chunks:
      longest = max(len(prompts[i]) for i in chunk)
      room = model.config.context_length - longest
      if room <= 0:
        raise JaxllmError(f"a test prompt of {longest} tokens fills the context length "
                          f"{model.config.context_length}; nothing left to generate")
      new_tokens = generate_lib.generate(
          model, backbone_params, [prompts[i] for i in chunk], min(max_new_tokens, room),
          temperature=0.0, eot_id=tokenizer.eot_id, vocab_size=tokenizer.vocab_size)
      for i, tokens in zip(chunk, new_tokens):
        responses[i] = instruction.clean_response(tokenizer.decode(tokens), template)
      bar.update(len(chunk))
  return [{**record, "model_response": response} for record, response in zip(records, responses)]


# --- The judge ----------------------------------------------------------------------------


def judge_prompt(entry: dict, template: str = "alpaca") -> str:
  """The book's ch. 7 scoring prompt."""
  return (f"Given the input `{instruction.format_prompt(entry, template)}` "
          f"and correct output `{entry['output']}`, "
          f"score the model response `{entry['model_response']}`"
          f" on a scale from 0 to 100, where 100 is the best score. "
          f"Respond with the integer number only.")


def api_url(url: str, path: str) -> str:
  """`path` (e.g. /chat/completions) under an OpenAI-compatible server's /v1."""
  url = url.rstrip("/")
  return (url if url.endswith("/v1") else url + "/v1") + path


def chat_url(url: str) -> str:
  return api_url(url, "/chat/completions")


def request_json(url: str, body: dict | None = None, *, what: str, timeout: float = 120.0,
                 http_hint: str = "", unreachable_hint: str = "is its server running?") -> Any:
  """The JSON answer of a GET (body None) or a JSON POST; failures as one-line JaxllmErrors
  naming `what` was asked, with a hint."""
  data = None if body is None else json.dumps(body).encode("utf-8")
  request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                   method="GET" if body is None else "POST")
  try:
    with urllib.request.urlopen(request, timeout=timeout) as response:
      return json.loads(response.read().decode("utf-8"))
  except urllib.error.HTTPError as e:
    raise JaxllmError(f"{what} at {url} answered HTTP {e.code} "
                      f"({e.read()[:200].decode('utf-8', 'replace')!r})"
                      f"{'; ' + http_hint if http_hint else ''}") from None
  except (urllib.error.URLError, TimeoutError, OSError) as e:
    raise JaxllmError(f"{what} at {url} is unreachable ({e}); {unreachable_hint}") from None
  except ValueError:
    raise JaxllmError(f"{what} at {url} did not answer JSON") from None


def chat(url: str, messages: list[dict], *, model: str, seed: int = 123,
         max_tokens: int | None = None, timeout: float = 120.0, what: str = "the endpoint",
         http_hint: str = "", unreachable_hint: str = "is its server running?") -> str:
  """The reply of an OpenAI-compatible chat endpoint to `messages` (greedy, seeded)."""
  body = {"model": model, "messages": messages, "temperature": 0.0, "seed": seed}
  if max_tokens is not None:
    body["max_tokens"] = max_tokens
  reply = request_json(chat_url(url), body, what=what, timeout=timeout, http_hint=http_hint,
                       unreachable_hint=unreachable_hint)
  try:
    return str(reply["choices"][0]["message"]["content"] or "")
  except (KeyError, IndexError, TypeError):
    raise JaxllmError(f"{what} at {chat_url(url)} did not answer in the OpenAI chat format "
                      f"(choices[0].message.content)") from None


def query_judge(prompt: str, *, url: str, model: str, timeout: float = 120.0) -> str:
  """The judge's reply to one user message (greedy, seed 123)."""
  return chat(url, [{"role": "user", "content": prompt}], model=model, timeout=timeout,
              what="judge", http_hint=f"is judge.model '{model}' served there?",
              unreachable_hint="start the server or unset judge.url")


def parse_score(reply: str) -> int | None:
  """The first integer of a reply, if it is a score in 0..100 (else None, not counted)."""
  match = re.search(r"-?\d+", reply)
  if match is None:
    return None
  score = int(match.group())
  return score if 0 <= score <= 100 else None


def judge_responses(entries: Sequence[dict], *, url: str, model: str, template: str = "alpaca",
                    timeout: float = 120.0, progress: bool = True) -> dict[str, Any]:
  """Scores of each response; their mean over the parsable ones (the book skips the rest)."""
  scores = []
  for entry in progress_bar(entries, desc="judge", unit="response", disable=not progress):
    scores.append(parse_score(query_judge(judge_prompt(entry, template), url=url, model=model,
                                          timeout=timeout)))
  valid = [s for s in scores if s is not None]
  return {"judge_score": float(np.mean(valid)) if valid else None,
          "judge_scored": len(valid), "judge_unparsed": len(scores) - len(valid),
          "scores": scores}


