"""Evaluation: perplexity of any text, classifier metrics, instruction responses, a judge, and
the final report of a run.

- `perplexity`: exp of the mean next-token loss over consecutive context-length windows.
- `classification_metrics`: accuracy, precision, recall and F1 of a confusion matrix (rows:
  true class, columns: predicted), which the classifier's evaluation step sums.
- `generate_responses`: greedy responses to the test prompts written as the book writes them
  (each record + "model_response").
- `judge_responses`: the book's scoring prompt (0-100) sent to an OpenAI-compatible chat
  endpoint, POST {url}/v1/chat/completions, as Ollama and vLLM serve it; off unless
  `judge.url` is set.
- `final_report`: a task's own evaluation over every split its report needs, on the mesh
  (training's last stage, and `jaxllm eval` of a finetuned run via `evaluate_finetuned`).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import pathlib
import re
import urllib.error
import urllib.request
from typing import Any, Iterable, Sequence

import jax
import ml_collections
import numpy as np

from jaxllm import config as config_lib
from jaxllm import generate as generate_lib
from jaxllm import multihost
from jaxllm import run_io
from jaxllm import sharding
from jaxllm import train as train_lib
from jaxllm.data import batches as batches_lib
from jaxllm.data import instruction
from jaxllm.errors import JaxllmError
from jaxllm.progress import progress_bar
from jaxllm.model import GPT
from jaxllm.tasks import common
from jaxllm.tokenizer import Tokenizer

RESPONSES_FILE = "instruction-data-with-response.json"  # the book's name for it


# --- Language modelling -------------------------------------------------------------------


def perplexity(model: GPT, params: Any, tokens: np.ndarray, batch_size: int = 8,
               progress: bool = False) -> dict[str, float]:
  """Mean loss and perplexity over consecutive non-overlapping windows of `tokens` (the tail
  shorter than a window is left out, as the book's loaders leave it)."""
  if len(tokens) < 2:
    raise JaxllmError(f"perplexity needs at least 2 tokens, got {len(tokens)}")
  length = min(model.config.context_length, len(tokens) - 1)
  starts = batches_lib.sliding_starts(len(tokens), length, length)
  eval_fn = jax.jit(functools.partial(train_lib.eval_step, model=model))
  total, count = 0.0, 0.0
  for i in progress_bar(range(0, len(starts), batch_size), desc="perplexity",
                        disable=not progress):
    loss_sum, n = eval_fn(params, batches_lib.gather(tokens, starts[i:i + batch_size], length))
    total, count = total + float(loss_sum), count + float(n)
  loss = total / count
  return {"loss": loss, "perplexity": float(np.exp(loss)), "tokens": int(count)}


# --- Classifiers --------------------------------------------------------------------------


def classification_metrics(confusion_CxC: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
  """Accuracy, precision, recall and F1 of a confusion matrix (rows true, columns predicted).

  With two classes precision/recall/F1 are those of the second class (spam in ham,spam; the
  usual "positive" class); with more, their unweighted mean over classes (macro).
  """
  confusion_CxC = np.asarray(confusion_CxC, np.int64)
  num_classes = len(labels)
  true_positive_C = np.diag(confusion_CxC).astype(np.float64)
  predicted_C, actual_C = confusion_CxC.sum(axis=0), confusion_CxC.sum(axis=1)
  precision_C = np.divide(true_positive_C, predicted_C, out=np.zeros(num_classes),
                          where=predicted_C > 0)
  recall_C = np.divide(true_positive_C, actual_C, out=np.zeros(num_classes), where=actual_C > 0)
  both_C = precision_C + recall_C
  f1_C = np.divide(2 * precision_C * recall_C, both_C, out=np.zeros(num_classes),
                   where=both_C > 0)
  pick = (lambda v: float(v[1])) if num_classes == 2 else (lambda v: float(v.mean()))
  count = int(confusion_CxC.sum())
  return {"accuracy": float(true_positive_C.sum() / max(count, 1)),
          "precision": pick(precision_C), "recall": pick(recall_C), "f1": pick(f1_C),
          "confusion": confusion_CxC.tolist(), "labels": list(labels), "count": count}


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


def chat_url(url: str) -> str:
  url = url.rstrip("/")
  return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


def query_judge(prompt: str, *, url: str, model: str, timeout: float = 120.0) -> str:
  """The reply of an OpenAI-compatible chat endpoint to one user message (greedy, seeded)."""
  body = {"model": model, "messages": [{"role": "user", "content": prompt}],
          "temperature": 0.0, "seed": 123}
  request = urllib.request.Request(chat_url(url), data=json.dumps(body).encode("utf-8"),
                                   headers={"Content-Type": "application/json"}, method="POST")
  try:
    with urllib.request.urlopen(request, timeout=timeout) as response:
      reply = json.loads(response.read().decode("utf-8"))
    return str(reply["choices"][0]["message"]["content"])
  except urllib.error.HTTPError as e:
    raise JaxllmError(f"judge at {chat_url(url)} answered HTTP {e.code} "
                      f"({e.read()[:200].decode('utf-8', 'replace')!r}); is judge.model "
                      f"'{model}' served there?") from None
  except (urllib.error.URLError, TimeoutError, OSError) as e:
    raise JaxllmError(f"judge at {chat_url(url)} is unreachable ({e}); start the server "
                      f"or unset judge.url") from None
  except (ValueError, KeyError, IndexError, TypeError):
    raise JaxllmError(f"judge at {chat_url(url)} did not answer in the OpenAI chat format "
                      f"(choices[0].message.content)") from None


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


# --- The final report ---------------------------------------------------------------------


@functools.lru_cache(maxsize=64)  # once per kind of batch array, not once per batch
def _batch_sharding(mesh, rules, ndim: int):
  return sharding.batch_sharding(mesh, rules, 0, ndim=ndim)


def split_sums(step, params: Any, batches: Iterable[dict[str, np.ndarray]], mesh, rules,
               batch_size: int) -> dict[str, np.ndarray]:
  """A split's sums: `step` (an eval step compiled on `mesh`, its sums replicated) over its
  batches of `batch_size` rows, each placed from this process's rows. Every process runs it
  and gets the same float64 sums."""
  rows = multihost.process_rows(_batch_sharding(mesh, rules, 1), (batch_size,), axis=0)

  def placed(batch):
    return {k: multihost.global_array(v[rows], _batch_sharding(mesh, rules, v.ndim),
                                      (batch_size, *v.shape[1:])) for k, v in batch.items()}

  return common.eval_sums(step(params, placed(batch)) for batch in batches)


def final_report(task: common.Task, params: Any, shardings: Any, mesh, rules, batch_size: int,
                 workdir: pathlib.Path, figures: dict[str, Any]) -> dict[str, Any]:
  """eval.json's figures: `figures` (training's), then each of the task's report splits
  through its report step, compiled on the mesh with the parameters' `shardings` as every
  evaluation is, then the task's report (a sample, responses). Every process runs it (the
  parameters are sharded over all of them); process 0 prints and writes."""
  step = sharding.jit_eval_step(task.report_fn or task.eval_fn, shardings, mesh, rules)
  batches = task.report_batches or task.eval_batches
  for split in task.report_splits:
    sums = split_sums(step, params, batches(split), mesh, rules, batch_size)
    figures = {**figures, **(task.report_figures or common.split_figures)(split, sums)}
  # Other processes run the report for its collectives only: its lines are process 0's.
  quiet = contextlib.nullcontext() if multihost.is_main() else contextlib.redirect_stdout(
      io.StringIO())
  with quiet:
    return task.report(pathlib.Path(workdir), params, figures)


def run_task(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> common.Task:
  """A finished run's task, built as training built it, its model and tokenizer the run's own
  (train.init_from need not exist any more)."""
  from jaxllm import tasks

  config = config_lib.from_dict(config.to_dict())
  with config.ignore_type():
    config.train.init_from = str(workdir)
  return tasks.build(config)


def evaluate_finetuned(config: ml_collections.ConfigDict, model: GPT, params: Any,
                       tokenizer: Tokenizer, workdir: str | pathlib.Path, *,
                       progress: bool = True, extra: dict | None = None) -> dict[str, Any]:
  """`jaxllm eval` of a finetuned run: its task's final report on the saved model
  ({"backbone", "head"}, adapters merged; DPO's reference from train.init_from), on the mesh
  of config.mesh, as training ended; merged with `extra` into workdir/eval.json."""
  del model, tokenizer, progress  # the task's own, and its report's bars
  workdir = pathlib.Path(workdir)
  if config.train.task not in ("classify", "instruct", "dpo"):
    raise JaxllmError(f"{workdir} is not a finetuned run (train.task is "
                      f"'{config.train.task}'); for a language model use --text FILE")
  task = run_task(config, workdir)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_rules(config.mesh.rules)
  every = sharding.param_shardings(task.param_axes, mesh, rules)
  shardings = {name: every[name] for name in ("backbone", "head", "reference") if name in every}
  params = {name: jax.device_put(params[name], shardings[name]) for name in ("backbone", "head")}
  if "reference" in shardings:  # the frozen starting model, not saved with the run
    target = jax.eval_shape(task.init_params)["reference"]
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          target, shardings["reference"])
    params["reference"] = run_io.load_params(config.train.init_from, target, cast_floats=True)
  figures = final_report(task, params, shardings, mesh, rules, config.train.batch_size,
                         workdir, dict(extra or {}))
  if not multihost.is_main():
    return figures
  return write_figures(workdir, figures)


def write_figures(workdir: str | pathlib.Path, figures: dict[str, Any]) -> dict[str, Any]:
  """Merges `figures` into workdir/eval.json (a re-evaluation keeps what training recorded
  there: steps, times, parameter counts); returns the whole file's contents."""
  path = pathlib.Path(workdir) / "eval.json"
  previous = json.loads(path.read_text()) if path.is_file() else {}
  figures = {**previous, **figures}
  path.write_text(json.dumps(figures, indent=2) + "\n")
  return figures
