"""The final report of a run: a task's own evaluation over every split its report needs, on
the mesh (training's last stage, and `jaxllm eval` of a finetuned run via
`evaluate_finetuned`)."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import pathlib
from typing import Any, Iterable

import jax
import ml_collections
import numpy as np

from jaxllm import config as config_lib
from jaxllm import tasks
from jaxllm.data.tokenizer import Tokenizer
from jaxllm.errors import JaxllmError
from jaxllm.models.gpt import GPT
from jaxllm.tasks import common
from jaxllm.training import multihost, sharding
from jaxllm.training import rundir as run_io

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
                 workdir: pathlib.Path, figures: dict[str, Any],
                 microbatches: int = 1) -> dict[str, Any]:
  """eval.json's figures: `figures` (training's), then each of the task's report splits
  through its report step, compiled on the mesh with the parameters' `shardings` as every
  evaluation is, then the task's report (a sample, responses). Every process runs it (the
  parameters are sharded over all of them); process 0 prints and writes. `microbatches`:
  each batch is summed in that many slices (train.grad_accum: no more memory than training)."""
  step = sharding.jit_eval_step(task.report_fn or task.eval_fn, shardings, mesh, rules,
                                microbatches)
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
                         workdir, dict(extra or {}), config.train.grad_accum)
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
