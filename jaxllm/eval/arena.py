"""`jaxllm arena`: pairwise battles between models on a prompt set, judged, logged, rated.

- Answers: a jaxllm run answers in-process (greedy, the run's instruct.template, as
  instruction finetuning's own test responses: eval/responses.py); an OpenAI-compatible
  endpoint (`jaxllm serve`, vLLM, OpenAI) by URL, through POST /v1/chat/completions
  (temperature 0, the arena's seed). They are cached in OUT/answers.jsonl, keyed by model and
  prompt id with a hash of the prompt: a rerun asks for the missing ones only.
- Verdicts: MT-Bench's pairwise judge prompt (pair-v2: "[[A]]", "[[B]]" or "[[C]]" for a tie)
  sent to an OpenAI-compatible judge twice, the answers swapped the second time; verdicts that
  disagree are a tie, and a reply with no verdict in it makes the battle an error (kept in the
  log, left out of the ratings), both as MT-Bench counts them. Or people's votes from a JSONL
  file ({"prompt_id", "model_a", "model_b", "winner": "a" | "b" | "tie"}).
- The battle log, OUT/battles.jsonl: one line per judged battle, appended and flushed as it
  is judged. A killed arena run again skips the battles logged (a torn last line is dropped).
- Then eval/leaderboard.py: ratings, the leaderboard and its plots.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import pathlib
from typing import Any, Callable, Sequence

import numpy as np

from jaxllm.errors import JaxllmError
from jaxllm.eval import responses
from jaxllm.progress import progress_bar

ANSWERS, BATTLES = "answers.jsonl", "battles.jsonl"

# MT-Bench's pairwise judge (FastChat llm_judge, prompt "pair-v2"), single turn.
JUDGE_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by "
    "two AI assistants to the user question displayed below. You should choose the assistant "
    "that follows the user's instructions and answers the user's question better. Your "
    "evaluation should consider factors such as the helpfulness, relevance, accuracy, depth, "
    "creativity, and level of detail of their responses. Begin your evaluation by comparing "
    "the two responses and provide a short explanation. Avoid any position biases and ensure "
    "that the order in which the responses were presented does not influence your decision. "
    "Do not allow the length of the responses to influence your evaluation. Do not favor "
    "certain names of the assistants. Be as objective as possible. After providing your "
    "explanation, output your final verdict by strictly following this format: \"[[A]]\" if "
    "assistant A is better, \"[[B]]\" if assistant B is better, and \"[[C]]\" for a tie.")
JUDGE_USER = ("[User Question]\n{question}\n\n[The Start of Assistant A's Answer]\n{answer_a}\n"
              "[The End of Assistant A's Answer]\n\n[The Start of Assistant B's Answer]\n"
              "{answer_b}\n[The End of Assistant B's Answer]")

# A source of answers: a run directory, an http(s) URL, or (from Python) records -> answers.
Source = str | Callable[[list[dict]], list[str]]


# --- Files --------------------------------------------------------------------------------


def read_prompts(path: str | pathlib.Path, limit: int = 0) -> list[dict]:
  """Alpaca records (instruction, optional input) of a .json list or .jsonl, each with an
  "id": its own, or its index in the file."""
  from jaxllm.data import instruction

  records = instruction.read_records(path, required=("instruction",))
  records = [{**r, "id": str(r.get("id", i))} for i, r in enumerate(records)]
  if len({r["id"] for r in records}) < len(records):
    raise JaxllmError(f"{path}: two prompts have the same id; give each its own")
  return records[:limit] if limit > 0 else records


def question(record: dict) -> str:
  """The prompt as a user writes it to a chat model: the instruction, then any input."""
  return record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")


def prompt_hash(record: dict) -> str:
  return hashlib.sha256(question(record).encode("utf-8")).hexdigest()[:16]


def read_jsonl(path: pathlib.Path) -> list[dict]:
  """The records of a JSONL log; a last line cut short by a kill is left out."""
  if not path.is_file():
    return []
  lines = path.read_text(encoding="utf-8").splitlines()
  records = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      if number < len(lines):
        raise JaxllmError(f"{path}:{number}: not valid JSON; the log is damaged") from None
  return records


class Log:
  """A JSONL file appended to line by line, each line flushed as it is written; a torn last
  line (a kill while writing) is cut off first."""

  def __init__(self, path: pathlib.Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file():
      data = path.read_bytes()
      if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
          f.truncate(data.rfind(b"\n") + 1)
    self.file = open(path, "a", encoding="utf-8")

  def write(self, record: dict) -> None:
    self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
    self.file.flush()  # in the operating system's hands: a killed process loses nothing

  def close(self) -> None:
    self.file.close()


def parse_models(spec: str) -> dict[str, str]:
  """`NAME=RUN_DIR_OR_URL,...` as a dict (in order)."""
  models = {}
  for part in filter(None, (p.strip() for p in spec.split(","))):
    name, sep, source = part.partition("=")
    if not sep or not name or not source:
      raise JaxllmError(f"--models takes NAME=RUN_DIR_OR_URL,...; got '{part}'")
    if name in models:
      raise JaxllmError(f"--models names '{name}' twice")
    models[name] = source
  if len(models) < 2:
    raise JaxllmError("an arena needs at least two models in --models")
  return models


# --- OpenAI-compatible endpoints ----------------------------------------------------------


def endpoint_model(url: str, name: str, timeout: float = 30.0) -> str:
  """The model id to ask at `url`: `name` if the endpoint lists it, else its only model."""
  listed = responses.request_json(responses.api_url(url, "/models"), what=f"model '{name}'",
                                  timeout=timeout)
  ids = [m.get("id") for m in listed.get("data", [])]
  if name in ids or not ids:
    return name
  if len(ids) == 1:
    return ids[0]
  raise JaxllmError(f"{url} serves {', '.join(ids)}; name the model as one of them")


def chat(url: str, model: str, messages: list[dict], *, max_tokens: int, seed: int = 0,
         timeout: float = 120.0, what: str = "the endpoint") -> str:
  """The reply of an OpenAI-compatible chat endpoint (greedy, seeded)."""
  return responses.chat(url, messages, model=model, seed=seed, max_tokens=max_tokens,
                        timeout=timeout, what=what,
                        http_hint=f"is the model '{model}' served there?")


def url_judge(url: str, model: str, *, max_tokens: int = 512, seed: int = 0,
              timeout: float = 120.0) -> Callable[[list[dict]], str]:
  """A judge: chat messages -> its reply, from an OpenAI-compatible endpoint."""
  return lambda messages: chat(url, model, messages, max_tokens=max_tokens, seed=seed,
                               timeout=timeout, what="the judge")


# --- Answers ------------------------------------------------------------------------------


def _run_answers(workdir: str, records: list[dict], max_tokens: int, progress: bool
                 ) -> list[str]:
  """Greedy answers of a jaxllm run, in its prompt template (instruct.template)."""
  from jaxllm.training import rundir

  config, model, params, tokenizer = rundir.load_run(workdir, decoder_for="answering prompts")
  answered = responses.generate_responses(model, params, tokenizer, records,
                                          template=config.instruct.template,
                                          max_new_tokens=max_tokens, progress=progress)
  return [r["model_response"] for r in answered]


def answers_of(name: str, source: Source, records: list[dict], *, max_tokens: int, seed: int,
               progress: bool) -> list[str]:
  """The answers of one model to `records`."""
  if callable(source):
    return list(source(records))
  if source.startswith(("http://", "https://")):
    model = endpoint_model(source, name)
    return [chat(source, model, [{"role": "user", "content": question(r)}],
                 max_tokens=max_tokens, seed=seed, what=f"model '{name}'")
            for r in progress_bar(records, desc=name, unit="answer", disable=not progress)]
  if not pathlib.Path(source).is_dir():
    raise JaxllmError(f"model '{name}': {source} is neither a run directory nor an http(s) URL")
  return _run_answers(source, records, max_tokens, progress)


def collect_answers(models: dict[str, Source], records: list[dict], out: pathlib.Path, *,
                    max_tokens: int = 256, seed: int = 0, progress: bool = True
                    ) -> dict[tuple[str, str], str]:
  """{(model, prompt id): answer} for every model and prompt, from OUT/answers.jsonl where
  they are there, the others asked for and appended to it."""
  path = out / ANSWERS
  cached = {(a["model"], a["prompt_id"]): a for a in read_jsonl(path)}
  answers = {}
  log = Log(path)
  try:
    for name, source in models.items():
      missing = []
      for record in records:
        entry = cached.get((name, record["id"]))
        if entry is None:
          missing.append(record)
        elif entry.get("prompt_hash") != prompt_hash(record):
          raise JaxllmError(f"{path} holds model '{name}''s answer to another prompt "
                            f"{record['id']}; give the arena a new --out")
        else:
          answers[name, record["id"]] = entry["answer"]
      if missing:
        texts = answers_of(name, source, missing, max_tokens=max_tokens, seed=seed,
                           progress=progress)
        for record, text in zip(missing, texts):
          log.write({"model": name, "prompt_id": record["id"], "prompt_hash": prompt_hash(record),
                     "answer": text})
          answers[name, record["id"]] = text
  finally:
    log.close()
  return answers


# --- Verdicts -----------------------------------------------------------------------------


def judge_messages(text: str, answer_a: str, answer_b: str) -> list[dict]:
  return [{"role": "system", "content": JUDGE_SYSTEM},
          {"role": "user", "content": JUDGE_USER.format(question=text, answer_a=answer_a,
                                                        answer_b=answer_b)}]


def parse_verdict(reply: str) -> str:
  """"A", "B", "C" (a tie) or "error", as MT-Bench reads a pairwise judgment."""
  for verdict in ("A", "B", "C"):
    if f"[[{verdict}]]" in reply:
      return verdict
  return "error"


def judge_battle(judge: Callable[[list[dict]], str], text: str, answer_a: str, answer_b: str
                 ) -> tuple[str, list[str]]:
  """(winner, [verdict with a first, verdict with b first]): model_a, model_b or tie (the two
  orders disagree, or both say tie), or error (a reply without a verdict)."""
  first = parse_verdict(judge(judge_messages(text, answer_a, answer_b)))
  second = parse_verdict(judge(judge_messages(text, answer_b, answer_a)))
  if "error" in (first, second):
    return "error", [first, second]
  as_a = {"A": "model_a", "B": "model_b", "C": "tie"}[first]
  as_b = {"A": "model_b", "B": "model_a", "C": "tie"}[second]
  return (as_a if as_a == as_b else "tie"), [first, second]


def schedule(models: Sequence[str], records: Sequence[dict], battles: int = 0, seed: int = 0
             ) -> list[tuple[str, str, str]]:
  """(prompt id, model_a, model_b) of each battle: every pair of models on every prompt, in
  an order and with sides drawn from `seed`; the first `battles` of them (0: all)."""
  rng = np.random.default_rng(seed)
  every = [(r["id"], *pair) for r in records for pair in itertools.combinations(models, 2)]
  order = rng.permutation(len(every))
  flip = rng.random(len(every)) < 0.5
  drawn = [(every[i][0], *(every[i][2:0:-1] if flip[i] else every[i][1:])) for i in order]
  return drawn[:battles] if battles > 0 else drawn


def battle_key(prompt_id: str, a: str, b: str) -> tuple[str, frozenset]:
  return prompt_id, frozenset((a, b))


def run_battles(judge: Callable[[list[dict]], str], planned: Sequence[tuple[str, str, str]],
                records: Sequence[dict], answers: dict[tuple[str, str], str],
                out: pathlib.Path, *, judge_name: str = "judge", progress: bool = True
                ) -> list[dict]:
  """Every battle of OUT/battles.jsonl: those of `planned` it lacks judged and appended one
  by one (a battle already there, in either order of its models, is not asked again)."""
  path = out / BATTLES
  logged = read_jsonl(path)
  done = {battle_key(b["prompt_id"], b["model_a"], b["model_b"]) for b in logged}
  todo = [p for p in planned if battle_key(*p) not in done]
  by_id = {r["id"]: r for r in records}
  log = Log(path)
  try:
    for prompt_id, a, b in progress_bar(todo, desc="battles", unit="battle",
                                        disable=not progress):
      answer_a, answer_b = answers[a, prompt_id], answers[b, prompt_id]
      winner, verdicts = judge_battle(judge, question(by_id[prompt_id]), answer_a, answer_b)
      battle = {"prompt_id": prompt_id, "model_a": a, "model_b": b, "winner": winner,
                "verdicts": verdicts, "judge": judge_name, "len_a": len(answer_a),
                "len_b": len(answer_b)}
      log.write(battle)
      logged.append(battle)
  finally:
    log.close()
  return logged


def read_votes(path: str | pathlib.Path, answers: dict[tuple[str, str], str] | None = None
               ) -> list[dict]:
  """People's votes as battles: JSONL of {"prompt_id", "model_a", "model_b", "winner": a, b
  or tie}; answer lengths from `answers` where it has both."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise JaxllmError(f"--votes {path} not found")
  winners = {"a": "model_a", "b": "model_b", "tie": "tie", "model_a": "model_a",
             "model_b": "model_b"}
  battles = []
  for number, vote in enumerate(read_jsonl(path), 1):
    if not isinstance(vote, dict) or vote.get("winner") not in winners or not all(
        isinstance(vote.get(k), str) for k in ("model_a", "model_b")):
      raise JaxllmError(f"{path}: vote {number} needs model_a, model_b and winner a, b or tie")
    prompt_id = str(vote.get("prompt_id", vote.get("id", number - 1)))
    battle = {"prompt_id": prompt_id, "model_a": vote["model_a"], "model_b": vote["model_b"],
              "winner": winners[vote["winner"]], "judge": "votes"}
    a, b = (answers or {}).get((vote["model_a"], prompt_id)), (answers or {}).get(
        (vote["model_b"], prompt_id))
    if a is not None and b is not None:
      battle.update(len_a=len(a), len_b=len(b))
    battles.append(battle)
  return battles


def arena(models: dict[str, Source], records: list[dict], out: str | pathlib.Path, *,
          judge: Callable[[list[dict]], str] | None = None, judge_name: str = "judge",
          votes: str | pathlib.Path | None = None, battles: int = 0, max_tokens: int = 256,
          seed: int = 0, anchor: str | None = None, baseline: str | None = None,
          rounds: int = 1000, progress: bool = True) -> dict[str, Any]:
  """Answers, battles (a judge's, or `votes`), ratings and OUT's leaderboard files; returns
  the leaderboard (eval/leaderboard.py's `compute`)."""
  from jaxllm.eval import leaderboard

  out = pathlib.Path(out)
  if (judge is None) == (votes is None):
    raise JaxllmError("give the arena a judge (--judge-url, --judge-model) or --votes FILE")
  answers = collect_answers(models, records, out, max_tokens=max_tokens, seed=seed,
                            progress=progress) if models else {}
  if votes is not None:
    fought = read_votes(votes, answers)
    names = list(models) or list(dict.fromkeys(
        itertools.chain.from_iterable((b["model_a"], b["model_b"]) for b in fought)))
  else:
    names = list(models)
    fought = run_battles(judge, schedule(names, records, battles, seed), records, answers, out,
                         judge_name=judge_name, progress=progress)
  board = leaderboard.compute(fought, names, anchor=anchor, baseline=baseline, rounds=rounds,
                              seed=seed)
  board["answer_length"] = {m: float(np.mean([len(answers[m, r["id"]]) for r in records]))
                            for m in models} if models else {}
  leaderboard.write(out, board)
  return board
