"""An arena of jaxllm runs on a CPU, end to end: answers, a judge on 127.0.0.1, a leaderboard.

    source scripts/setup.sh
    jaxllm finetune --config experiments/instruct_alpaca_cpu.py --workdir runs/arena/e2 \
        --config.data.path=$JAXLLM_SHARED_DATA/instruction-data.json
    jaxllm finetune --config experiments/instruct_alpaca_cpu.py --workdir runs/arena/e1 \
        --config.data.path=$JAXLLM_SHARED_DATA/instruction-data.json --config.train.epochs=1
    jaxllm finetune --config experiments/dpo_preference_cpu.py --workdir runs/arena/dpo \
        --config.data.path=$JAXLLM_SHARED_DATA/instruction-data-with-preference.json \
        --config.train.init_from=runs/arena/e2
    python benchmarks/arena_demo.py --models e1=runs/arena/e1,e2=runs/arena/e2,dpo=runs/arena/dpo \
        --data $JAXLLM_SHARED_DATA/instruction-data.json --out runs/arena/board [--serve dpo]

The prompts are the first --prompts records of the book's test split (records 935 to 1044 of
the 1,100, which none of the runs trained on). No LLM judge is reachable offline, so the judge
here is a stand-in with the same interface: an OpenAI-compatible server (FastAPI, uvicorn) on
127.0.0.1 that reads MT-Bench's pairwise prompt, scores each answer by its word-level F1
against the record's reference output (SQuAD's answer F1), explains, and ends with "[[A]]",
"[[B]]" or "[[C]]" (F1s within --tie-margin). `jaxllm arena` asks it in both orders as it
would ask an LLM. With --serve NAME that model answers through `jaxllm serve` (a process of
its own, by URL) instead of in-process. The two ask differently: a run answering in-process
continues the Alpaca prompt as the book's test responses do (the model writes the
"### Response:" marker itself, and it counts against --max-tokens), while `jaxllm serve`'s
chat template ends the prompt with that marker, so greedy answers need not be the same.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import time
import urllib.request

import fastapi

from jaxllm import cli
from jaxllm.data import instruction
from jaxllm.eval import arena
from jaxllm.serve import server as server_lib

TEST_START = 935  # the book's split: 935 train, 110 test, 55 validation
ANSWER = re.compile(r"\[The Start of Assistant (.)'s Answer\]\n(.*?)\n\[The End", re.S)
QUESTION = re.compile(r"\[User Question\]\n(.*?)\n\n\[The Start", re.S)


def f1(answer: str, reference: str) -> float:
  """SQuAD's answer F1: the harmonic mean of word precision and recall (lower case, words)."""
  words, ref = re.findall(r"\w+", answer.lower()), re.findall(r"\w+", reference.lower())
  common = sum((collections.Counter(words) & collections.Counter(ref)).values())
  if common == 0:
    return 0.0
  precision, recall = common / len(words), common / len(ref)
  return 2 * precision * recall / (precision + recall)


def judge_app(references: dict[str, str], tie_margin: float) -> fastapi.FastAPI:
  """An OpenAI-compatible judge: the answer nearer the reference output wins."""
  app = fastapi.FastAPI()
  asked = collections.Counter()

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{"id": "reference-f1", "object": "model"}]}

  @app.post("/v1/chat/completions")
  async def chat(body: dict):
    text = body["messages"][-1]["content"]
    question = QUESTION.search(text).group(1)
    (_, a), (_, b) = ANSWER.findall(text)
    score_a, score_b = f1(a, references[question]), f1(b, references[question])
    verdict = "C" if abs(score_a - score_b) <= tie_margin else "A" if score_a > score_b else "B"
    asked[verdict] += 1
    reply = (f"Word F1 against the reference answer: assistant A {score_a:.3f}, assistant B "
             f"{score_b:.3f}. [[{verdict}]]")
    return {"id": "judge", "object": "chat.completion", "model": "reference-f1",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": reply}}]}

  app.state.asked = asked
  return app


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def served(workdir: str, name: str):
  """`jaxllm serve --workdir` in a process of its own; yields its URL once it is healthy."""
  port = free_port()
  process = subprocess.Popen([sys.executable, "-m", "jaxllm.cli", "serve", "--workdir", workdir,
                              "--port", str(port), "--model-name", name, "--slots", "8"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  url = f"http://127.0.0.1:{port}"
  try:
    for _ in range(600):
      if process.poll() is not None:
        raise SystemExit(f"jaxllm serve stopped: {process.stderr.read()[-2000:]}")
      try:
        with urllib.request.urlopen(url + "/health", timeout=2) as response:
          if response.status == 200:
            break
      except OSError:
        pass
      time.sleep(1)
    yield url + "/v1"
  finally:
    process.terminate()
    process.wait(timeout=60)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", required=True, help="NAME=RUN_DIR,... (jaxllm runs)")
  parser.add_argument("--data", required=True, help="the 1,100-record instruction-data.json")
  parser.add_argument("--out", required=True)
  parser.add_argument("--prompts", type=int, default=50)
  parser.add_argument("--tie-margin", type=float, default=0.02)
  parser.add_argument("--max-tokens", type=int, default=48, help="tokens of each answer")
  parser.add_argument("--serve", help="the model (a NAME of --models) to ask through jaxllm serve")
  args = parser.parse_args()

  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  records = instruction.read_records(args.data)[TEST_START:TEST_START + args.prompts]
  prompts = [{**r, "id": f"test-{i}"} for i, r in enumerate(records)]
  (out / "prompts.json").write_text(json.dumps(prompts, indent=1, ensure_ascii=False))
  references = {arena.question(r): r["output"] for r in prompts}
  models = arena.parse_models(args.models)
  app = judge_app(references, args.tie_margin)
  judge = server_lib.Background(app)
  with contextlib.ExitStack() as stack:
    if args.serve:
      url = stack.enter_context(served(models[args.serve], args.serve))
      models = {**models, args.serve: url}
    spec = ",".join(f"{name}={source}" for name, source in models.items())
    status = cli.main(["arena", "--models", spec, "--prompts", str(out / "prompts.json"),
                       "--out", str(out), "--judge-url", judge.url + "/v1",
                       "--judge-model", "reference-f1", "--max-tokens", str(args.max_tokens)])
  judge.stop()
  print(f"judge verdicts asked: {dict(app.state.asked)} (both orders of each battle)")
  sys.exit(status)


if __name__ == "__main__":
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  main()
