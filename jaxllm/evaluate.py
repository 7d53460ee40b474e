"""Evaluation: perplexity of any text, classifier metrics, instruction responses and a judge.

- `perplexity`: exp of the mean next-token loss over consecutive context-length windows.
- `classify_split` / `classification_metrics`: accuracy, precision, recall, F1 and the
  confusion matrix (rows: true class, columns: predicted).
- `instruction_loss`, `generate_responses`: the loss over a split, and greedy responses to
  the test prompts written as the book writes them (each record + "model_response").
- `judge_responses`: the book's scoring prompt (0-100) sent to an OpenAI-compatible chat
  endpoint, POST {url}/v1/chat/completions, as Ollama and vLLM serve it; off unless
  `judge.url` is set.
- `evaluate_finetuned`: all of the above a finetuned run's task calls for, into eval.json.
"""

from __future__ import annotations

import functools
import json
import pathlib
import re
import urllib.error
import urllib.request
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxllm import generate as generate_lib
from jaxllm import train as train_lib
from jaxllm.data import batches as batches_lib
from jaxllm.data import classification
from jaxllm.data import instruction
from jaxllm.errors import JaxllmError
from jaxllm.model import GPT
from jaxllm.tasks import losses as loss_lib
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
  for i in tqdm(range(0, len(starts), batch_size), desc="perplexity", disable=not progress):
    loss_sum, n = eval_fn(params, batches_lib.gather(tokens, starts[i:i + batch_size], length))
    total, count = total + float(loss_sum), count + float(n)
  loss = total / count
  return {"loss": loss, "perplexity": float(np.exp(loss)), "tokens": int(count)}


# --- Classifiers --------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("backbone", "lora_scale", "pooling"))
def _classify_batch(params, batch, *, backbone, lora_scale: float, pooling: str):
  logits_BxC = loss_lib.classifier_logits(params, batch, backbone=backbone, lora_scale=lora_scale,
                                          pooling=pooling)
  losses_B = optax.softmax_cross_entropy_with_integer_labels(logits_BxC, batch["label_B"])
  return jnp.argmax(logits_BxC, axis=-1), losses_B


def classify_split(params: Any, split: dict[str, np.ndarray], batch_size: int, *,
                   backbone, lora_scale: float = 0.0, max_batches: int = 0,
                   pooling: str = "last") -> dict[str, Any]:
  """Predictions, mean loss and accuracy over a split (or its first `max_batches` batches)."""
  predicted, losses, labels = [], [], []
  for i, batch in enumerate(classification.batches(split, batch_size)):
    if max_batches and i >= max_batches:
      break
    n = len(batch["label_B"])
    # A short last batch is filled up with copies of its first row: one shape, one compile.
    full = {k: np.concatenate([v, np.repeat(v[:1], batch_size - n, axis=0)])
            for k, v in batch.items()}
    predicted_B, losses_B = _classify_batch(params, full, backbone=backbone,
                                            lora_scale=float(lora_scale), pooling=pooling)
    predicted.append(np.asarray(predicted_B)[:n])
    losses.append(np.asarray(losses_B)[:n])
    labels.append(batch["label_B"])
  predicted_N, label_N = np.concatenate(predicted), np.concatenate(labels)
  return {"loss": float(np.concatenate(losses).mean()),
          "accuracy": float(np.mean(predicted_N == label_N)),
          "predicted": predicted_N, "label": label_N}


def classification_metrics(predicted_N: np.ndarray, label_N: np.ndarray,
                           labels: Sequence[str]) -> dict[str, Any]:
  """Accuracy, precision, recall, F1 and the confusion matrix (rows true, columns predicted).

  With two classes precision/recall/F1 are those of the second class (spam in ham,spam; the
  usual "positive" class); with more, their unweighted mean over classes (macro).
  """
  num_classes = len(labels)
  confusion_CxC = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(confusion_CxC, (label_N, predicted_N), 1)
  true_positive_C = np.diag(confusion_CxC).astype(np.float64)
  predicted_C, actual_C = confusion_CxC.sum(axis=0), confusion_CxC.sum(axis=1)
  precision_C = np.divide(true_positive_C, predicted_C, out=np.zeros(num_classes),
                          where=predicted_C > 0)
  recall_C = np.divide(true_positive_C, actual_C, out=np.zeros(num_classes), where=actual_C > 0)
  both_C = precision_C + recall_C
  f1_C = np.divide(2 * precision_C * recall_C, both_C, out=np.zeros(num_classes),
                   where=both_C > 0)
  pick = (lambda v: float(v[1])) if num_classes == 2 else (lambda v: float(v.mean()))
  return {"accuracy": float(true_positive_C.sum() / max(len(label_N), 1)),
          "precision": pick(precision_C), "recall": pick(recall_C), "f1": pick(f1_C),
          "confusion": confusion_CxC.tolist(), "labels": list(labels),
          "count": int(len(label_N))}


# --- Instruction models -------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("backbone", "lora_scale"))
def _weighted_loss_sums(params, batch, *, backbone: GPT, lora_scale: float):
  losses_BxL = loss_lib.token_losses(params, batch, backbone=backbone, lora_scale=lora_scale)
  return jnp.sum(losses_BxL * batch["weights_BxL"]), jnp.sum(batch["weights_BxL"])


def instruction_loss(params: Any, data: instruction.Encoded, batch_size: int, *, backbone: GPT,
                     lora_scale: float = 0.0, max_batches: int = 0, **batch_options) -> float:
  """Mean loss per weighted target over a split (or its first max_batches * batch_size
  records); batch_options are make_batch's (pad_id, max_length, pad_multiple, mask_prompt)."""
  total, count = 0.0, 0.0
  for rows in instruction.eval_batches(data, batch_size, limit=max_batches * batch_size):
    loss_sum, n = _weighted_loss_sums(params, instruction.make_batch(data, rows, **batch_options),
                                      backbone=backbone, lora_scale=float(lora_scale))
    total, count = total + float(loss_sum), count + float(n)
  return total / max(count, 1.0)


def generate_responses(model: GPT, backbone_params: Any, tokenizer: Tokenizer,
                       records: Sequence[dict], *, template: str, max_new_tokens: int,
                       batch_size: int = 16, progress: bool = True) -> list[dict]:
  """Each record + "model_response": a greedy continuation of its prompt up to EOS or
  max_new_tokens (fewer if the context is short), the response marker stripped."""
  prompts = [tokenizer.encode(instruction.format_prompt(r, template)) for r in records]
  responses: list[str] = [""] * len(records)
  order = np.argsort([len(p) for p in prompts], kind="stable")  # similar lengths together
  chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
  with tqdm(total=len(records), desc="generate", unit="response", disable=not progress) as bar:
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
  for entry in tqdm(entries, desc="judge", unit="response", disable=not progress):
    scores.append(parse_score(query_judge(judge_prompt(entry, template), url=url, model=model,
                                          timeout=timeout)))
  valid = [s for s in scores if s is not None]
  return {"judge_score": float(np.mean(valid)) if valid else None,
          "judge_scored": len(valid), "judge_unparsed": len(scores) - len(valid),
          "scores": scores}


# --- A finetuned run ----------------------------------------------------------------------


def evaluate_finetuned(config: ml_collections.ConfigDict, model: GPT, params: Any,
                       tokenizer: Tokenizer, workdir: str | pathlib.Path, *,
                       progress: bool = True, extra: dict | None = None) -> dict[str, Any]:
  """The figures of a finetuned model ({"backbone", "head"}, adapters merged) on its task's
  splits, written with `extra` (training's figures; these take precedence) to
  workdir/eval.json."""
  workdir = pathlib.Path(workdir)
  task = config.train.task
  figure_fns = {"classify": _classify_figures, "instruct": _instruct_figures,
                "dpo": _dpo_figures}
  if task not in figure_fns:
    raise JaxllmError(f"{workdir} is not a finetuned run (train.task is '{task}'); for a "
                      f"language model use --text FILE")
  figures = figure_fns[task](config, model, params, tokenizer, workdir, progress)
  return write_figures(workdir, {**(extra or {}), "task": task, **figures})


def _classify_figures(config, model, params, tokenizer, workdir, progress) -> dict[str, Any]:
  data = classification.load(config.classifier, config.data.path, tokenizer,
                             model.config.context_length)
  figures: dict[str, Any] = {}
  for split in classification.SPLITS:
    result = classify_split(params, data.splits[split], config.train.batch_size, backbone=model,
                            pooling=loss_lib.pooling(config.classifier, model))
    report = classification_metrics(result["predicted"], result["label"], data.labels)
    figures[f"{split}_accuracy"] = report["accuracy"]
    figures[f"{split}_loss"] = result["loss"]
    figures[split] = report
  return figures


def _instruct_figures(config, model, params, tokenizer, workdir, progress) -> dict[str, Any]:
  records, encoded = instruction.load(config.instruct, config.data.path, tokenizer,
                                      config.train.seed)
  options = instruction.batch_options(config.instruct, model.config.context_length,
                                      tokenizer.eot_id)
  figures: dict[str, Any] = {
      f"{split}_loss": instruction_loss(params, encoded[split], config.train.batch_size,
                                        backbone=model, **options) for split in ("train", "val")}
  entries = generate_responses(
      model, params["backbone"], tokenizer, records["test"], template=config.instruct.template,
      max_new_tokens=config.instruct.max_new_tokens,
      batch_size=config.instruct.generate_batch_size, progress=progress)
  path = workdir / RESPONSES_FILE
  path.write_text(json.dumps(entries, indent=4) + "\n")
  figures["responses"] = str(path)
  if config.judge.url:
    judged = judge_responses(entries, url=config.judge.url, model=config.judge.model,
                             template=config.instruct.template, timeout=config.judge.timeout,
                             progress=progress)
    figures.update({k: v for k, v in judged.items() if k != "scores"})
  return figures


def _dpo_figures(config, model, params, tokenizer, workdir, progress) -> dict[str, Any]:
  """DPO loss and reward figures on every split, against the reference (train.init_from)."""
  from jaxllm import run_io
  from jaxllm.tasks import dpo

  _, _, reference, _ = run_io.load_run(config.train.init_from)
  records, pairs = dpo.load(config, tokenizer)
  shape = dpo.batch_shape(config, model, tokenizer)
  sums_fn = jax.jit(functools.partial(
      loss_lib.dpo_sums, backbone=model, beta=float(config.dpo.beta),
      average=bool(config.dpo.average_logprobs)))
  full = {"backbone": params["backbone"], "reference": reference, "head": {}}
  figures: dict[str, Any] = {}
  for split in ("train", "val", "test"):
    totals: dict[str, float] = {}
    for start in range(0, len(records[split]), config.train.batch_size):
      rows = np.arange(start, min(start + config.train.batch_size, len(records[split])))
      for name, value in sums_fn(full, dpo.pair_batch(pairs[split], rows, **shape)).items():
        totals[name] = totals.get(name, 0.0) + float(value)
    count = totals.pop("count")
    figures.update({f"{split}_{name}": value / count for name, value in totals.items()})
  return figures


def write_figures(workdir: str | pathlib.Path, figures: dict[str, Any]) -> dict[str, Any]:
  """Merges `figures` into workdir/eval.json (a re-evaluation keeps what training recorded
  there: steps, times, parameter counts); returns the whole file's contents."""
  path = pathlib.Path(workdir) / "eval.json"
  previous = json.loads(path.read_text()) if path.is_file() else {}
  figures = {**previous, **figures}
  path.write_text(json.dumps(figures, indent=2) + "\n")
  return figures
