"""What the one trainer (jaxllm/training/loop.py) trains: a task is data and pure functions.

    lm         next-token pretraining on a corpus (jaxllm/tasks/lm.py)
    mlm        masked-token pretraining of an encoder (jaxllm/tasks/mlm.py)
    classify   a class head on a GPT's last token or an encoder's pooled state (classify.py)
    instruct   Alpaca-style instruction tuning (jaxllm/tasks/instruct.py)
    dpo        preference tuning against a frozen reference (jaxllm/tasks/dpo.py)

`build(config)` returns the `Task` that `train.task` names; the pure losses they share are in
jaxllm/tasks/losses.py, the backbone, masks and batch helpers in jaxllm/tasks/common.py.
"""

from __future__ import annotations

from typing import Callable

import ml_collections

from jaxllm.errors import JaxllmError
from jaxllm.tasks import classify, dpo, instruct, lm, mlm
from jaxllm.tasks.common import Task, eval_means, eval_sums, split_figures

# train.task -> the function that builds it from the config.
REGISTRY: dict[str, Callable[[ml_collections.ConfigDict], Task]] = {
    "lm": lm.make_task, "mlm": mlm.make_task, "classify": classify.make_task,
    "instruct": instruct.make_task, "dpo": dpo.make_task,
}
NAMES = tuple(REGISTRY)


def build(config: ml_collections.ConfigDict) -> Task:
  """The task `config.train.task` names, its data loaded and its parameters described."""
  if config.train.task not in NAMES:
    raise JaxllmError(f"train.task must be one of {', '.join(NAMES)}, got "
                      f"'{config.train.task}'")
  return REGISTRY[config.train.task](config)


__all__ = ["NAMES", "REGISTRY", "Task", "build", "eval_means", "eval_sums", "split_figures"]
