"""Figures of a model: perplexity of any text, and a classifier's accuracy, precision, recall
and F1 from its confusion matrix."""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import numpy as np

from jaxllm.data import batches as batches_lib
from jaxllm.errors import JaxllmError
from jaxllm.models.gpt import GPT
from jaxllm.progress import progress_bar
from jaxllm.training import step as train_lib

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


