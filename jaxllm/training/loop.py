"""`jaxllm train` and `jaxllm finetune`: one trainer for every task.

A task (jaxllm/tasks/) is data and pure functions: its parameters, batches as a function of
(seed, step), loss, evaluation sums and final report. Everything else is here, the same for
pretraining, classification, instruction tuning and DPO: the mesh and shardings, the
optimizer with its trainable mask, gradient accumulation, the jitted steps, the progress
bar and metrics, evaluation every `train.eval_every` steps (and at each epoch's end),
checkpoints every `checkpoint.every_steps` (a run directory holding checkpoints resumes from
the latest; SIGTERM saves and stops), multi-host runs, and the saved run directory.

`run` reads top to bottom: set up, restore or initialise, loop (step, log, evaluate, save),
finish.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import pathlib
import shutil
import time
from typing import Any

import jax
import ml_collections
import optax

from jaxllm import config as config_lib
from jaxllm import tasks as tasks_lib
from jaxllm.errors import JaxllmError, Preempted
from jaxllm.eval import report
from jaxllm.models.gpt import count_params
from jaxllm.progress import progress_bar
from jaxllm.training import checkpoint as checkpoint_lib
from jaxllm.training import metrics as metrics_lib
from jaxllm.training import multihost, prefetch, sharding
from jaxllm.training import rundir as run_io
from jaxllm.training import step as train_lib
from jaxllm.training.setup import Setup, describe, initial_state, log, set_up


def _global_batch(setup: Setup, rows: dict, axis: int, full_rows: int) -> dict:
  """Global arrays from this process's rows (along `axis`) of each batch entry."""
  out = {}
  for key, value in rows.items():
    shape = (*value.shape[:axis], full_rows, *value.shape[axis + 1:])
    out[key] = multihost.global_array(value, _batch_sharding(setup.mesh, setup.rules, axis,
                                                             value.ndim), shape)
  return out


def _train_batch(setup: Setup, step: int) -> tuple[int, int, dict]:
  """(this process's tokens, their rows' length, the global batch on the devices) of
  training step `step`."""
  rows = setup.task.train_batch(step, setup.train_rows)
  train, tokens = setup.config.train, rows[setup.task.token_key]
  return tokens.size, tokens.shape[-1], _global_batch(setup, rows, 1,
                                                      train.batch_size // train.grad_accum)


@functools.lru_cache(maxsize=64)  # once per kind of batch array, not once per step
def _batch_sharding(mesh, rules, axis: int, ndim: int):
  return sharding.batch_sharding(mesh, rules, axis, ndim=ndim)


def evaluate(setup: Setup, eval_fn, params: Any) -> dict[str, float]:
  """Each evaluated split's figures: the task's sums over its evaluation batches / count."""
  figures = {}
  for split in ("train", "val"):
    sums = report.split_sums(eval_fn, params, setup.task.eval_batches(split), setup.mesh,
                                   setup.rules, setup.config.train.batch_size)
    figures.update(tasks_lib.split_figures(split, sums))
  return figures


class Meter:
  """Throughput and MFU over the steps since the last log line."""

  def __init__(self, setup: Setup, flops_per_token, peak_flops: float):
    # flops_per_token(length): finetuning batches are padded to their longest row, not the
    # context, and attention costs what the row's length says.
    self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
    rows = setup.train_rows.stop - setup.train_rows.start
    self.scale = (setup.config.train.batch_size // setup.config.train.grad_accum) / rows
    self.total_wait = 0.0  # seconds the loop waited for batches, over the whole run
    self.total_tokens = 0.0  # tokens trained on, all processes' (a resumed run's set at start)
    self.reset()

  def reset(self) -> None:
    self.start, self.steps, self.tokens, self.wait = time.perf_counter(), 0, 0.0, 0.0
    self.flops = 0.0

  def add(self, local_tokens: int, length: int, wait_seconds: float) -> None:
    """A step of `local_tokens` in rows of `length`, whose batch the loop waited
    `wait_seconds` for."""
    self.steps += 1
    self.tokens += local_tokens * self.scale
    self.flops += local_tokens * self.scale * self.flops_per_token(length)
    self.wait += wait_seconds
    self.total_wait += wait_seconds
    self.total_tokens += local_tokens * self.scale

  def figures(self) -> dict[str, float]:
    seconds = time.perf_counter() - self.start
    tokens_per_s = self.tokens / seconds
    return {"tokens_per_s": tokens_per_s, "mfu": self.flops / seconds
            / (self.peak_flops * len(jax.devices())), "input_wait": self.wait / seconds}


def _step_record(setup: Setup, done: int, metrics: dict, meter: Meter) -> dict[str, float]:
  """The log line of a step: its loss and aux figures, learning rate, gradient norm, speed."""
  loss = float(metrics["loss"])  # waits for the step: timing is honest
  if not math.isfinite(loss):
    raise JaxllmError(f"loss became {loss} at step {done} (lower train.learning_rate or "
                      f"raise train.warmup_steps; files already in {setup.workdir} are kept)")
  schedule = train_lib.learning_rate_schedule(setup.config.train, setup.total_steps)
  return {"step": done, **{k: float(v) for k, v in metrics.items()},
          "lr": float(schedule(done - 1)), **meter.figures()}


@dataclasses.dataclass
class Progress:
  """The loop's running record: metrics written so far, the latest evaluation, timings."""

  writer: metrics_lib.MetricsWriter
  meter: "Meter"
  last_eval: dict[str, float]
  eval_seconds: float = 0.0
  started: float = 0.0  # perf_counter at the first step
  target: dict[str, float] | None = None  # the first evaluation at train.target_val_loss


_TARGET_KEYS = ("target_step", "target_tokens", "target_seconds")


def _resume_target(run: Progress, start_step: int, local_tokens: int) -> None:
  """A resumed run's target as its history recorded it, its tokens so far as steps x the
  first batch's (this process's `local_tokens`, scaled to all processes')."""
  run.target = next(({k: r[k] for k in _TARGET_KEYS} for r in run.writer.records
                     if "target_step" in r), None)
  run.meter.total_tokens = start_step * local_tokens * run.meter.scale


def _target_summary(train: ml_collections.ConfigDict, run: Progress) -> dict[str, Any]:
  """eval.json's figures of train.target_val_loss (None where the run never reached it)."""
  if not train.target_val_loss:
    return {}
  target = run.target or {}
  return {"target_val_loss": float(train.target_val_loss),
          "steps_to_target": target.get("target_step"),
          "tokens_to_target": target.get("target_tokens"),
          "seconds_to_target": target.get("target_seconds")}


def _reach_target(setup: Setup, run: Progress, done: int, record: dict, bar=None) -> None:
  """Adds target_step, target_tokens and target_seconds (training time, evaluations left out)
  to the record of the first evaluation whose val_loss <= train.target_val_loss (0 = off)."""
  target = float(setup.config.train.target_val_loss)
  if not target or run.target is not None or record.get("val_loss", math.inf) > target:
    return
  seconds = time.perf_counter() - run.started - run.eval_seconds if done else 0.0
  run.target = dict(zip(_TARGET_KEYS, (done, run.meter.total_tokens, seconds)))
  record.update(run.target)
  log(setup, f"step {done}: val loss {record['val_loss']:.4f} <= train.target_val_loss "
             f"{target} after {run.meter.total_tokens:,.0f} tokens, {seconds:.1f} s", bar)


def train_loop(setup: Setup, state, start_step: int, progress: bool,
               on_evaluation=None) -> tuple[Any, dict]:
  """Steps from `start_step` to the end: log, evaluate, save; returns (state, summary).

  `on_evaluation(step, figures)` sees every evaluation during training (a sweep's pruner);
  an exception it raises stops the run, with what was saved kept.
  """
  task, train, total = setup.task, setup.config.train, setup.total_steps
  step_fn = sharding.jit_train_step(task_step(task, setup.optimizer), setup.shardings,
                                    setup.mesh, setup.rules)
  eval_fn = sharding.jit_eval_step(task.eval_fn, setup.shardings.params, setup.mesh,
                                   setup.rules, microbatches=train.grad_accum)
  n_params = count_params(sharding.model_axes(task.model)[0])
  flops_per_token = functools.lru_cache(maxsize=None)(functools.partial(
      train_lib.flops_per_token, task.model, n_params, task.lm_head,
      reference=task.reference_forward))
  first = task.train_batch(min(start_step, total - 1), setup.train_rows)
  first_length = first[task.token_key].shape[-1]
  peak_flops = train.peak_flops or _measured_peak_flops(task.model.config)
  describe(setup, state, peak_flops, flops_per_token(first_length), first_length)
  run = Progress(_metrics_writer(setup, start_step), Meter(setup, flops_per_token, peak_flops),
                 evaluate(setup, eval_fn, state.params))
  _resume_target(run, start_step, first[task.token_key].size)
  if not start_step:
    record = {"step": 0, **run.last_eval}
    _reach_target(setup, run, 0, record)
    run.writer.write(record)
  log(setup, f"step {start_step}: " + _figures_text(run.last_eval))
  log(setup, f"TensorBoard: tensorboard --logdir {setup.workdir / 'tensorboard'}")
  bar = progress_bar(total=total, initial=start_step, desc=train.task, unit="step",
                     disable=not (progress and setup.main), dynamic_ncols=True)
  train_start = run.started = time.perf_counter()
  batches = prefetch.Prefetcher(functools.partial(_train_batch, setup), start_step, total,
                                setup.config.data.prefetch)
  with jax.set_mesh(setup.mesh), checkpoint_lib.PreemptionWatch() as preemption, batches:
    try:
      for step in range(start_step, total):
        wait_start = time.perf_counter()
        tokens, length, batch = batches.get(step)
        run.meter.add(tokens, length, time.perf_counter() - wait_start)
        state, metrics = step_fn(state, batch)
        done = step + 1
        is_eval = (config_lib.every(done, train.eval_every) or done == total or (
            train.epochs > 0 and done % task.batches_per_epoch == 0))
        if config_lib.every(done, train.log_every) or is_eval:
          _log_step(setup, run, done, metrics, (eval_fn, state.params) if is_eval else None, bar)
        if is_eval and on_evaluation is not None:
          on_evaluation(done, run.last_eval)
        _save(setup, done, state, run.last_eval if is_eval else None, preemption)
    finally:
      bar.close()
      run.writer.close()
      setup.manager.close()  # waits for the last save
  return state, {**_summary(task, state, run, start_step, total,
                            time.perf_counter() - train_start - run.eval_seconds),
                 **_target_summary(train, run)}


def _summary(task, state, run: Progress, start_step: int, total: int,
             train_seconds: float) -> dict[str, Any]:
  """What the loop did: steps, seconds, parameter counts, speed, the first and last figures."""
  initial = next((r for r in run.writer.records if r["step"] == 0), {})
  trainable = (state.params if task.trainable is None else
               [p for p, t in zip(jax.tree.leaves(state.params), jax.tree.leaves(task.trainable))
                if t])
  return {"steps": total, "train_seconds": train_seconds,
          "total_params": count_params(state.params),
          "trainable_params": count_params(trainable),
          "steps_per_s": (total - start_step) / max(train_seconds, 1e-9),
          "input_wait": run.meter.total_wait / max(train_seconds, 1e-9),
          "initial_val_loss": initial.get("val_loss"), "final": run.last_eval,
          "records": run.writer.records}


def _measured_peak_flops(cfg) -> float:
  """A device's matmul FLOP/s in the dtype the model's matmuls take: bf16 operands (either
  key) are measured against the bf16 matmul's peak."""
  dtypes = (cfg.dtype, getattr(cfg, "matmul_dtype", cfg.dtype))
  return metrics_lib.measure_peak_flops("bfloat16" if "bfloat16" in dtypes else cfg.dtype)


def _log_step(setup: Setup, run: Progress, done: int, metrics: dict, evaluation, bar) -> None:
  """A metrics.jsonl record for step `done` (its loss, speed, and evaluation if any)."""
  record = _step_record(setup, done, metrics, run.meter)
  if evaluation is not None:
    eval_start = time.perf_counter()
    run.last_eval = evaluate(setup, *evaluation)
    run.eval_seconds += time.perf_counter() - eval_start
    record.update(run.last_eval)
    log(setup, f"step {done}: " + _figures_text(run.last_eval), bar)
    _reach_target(setup, run, done, record, bar)
  run.writer.write(record)
  bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:,.0f}",
                  mfu=f"{record['mfu']:.1%}")
  bar.update(run.meter.steps)
  run.meter.reset()


def task_step(task: tasks_lib.Task, optimizer: optax.GradientTransformation):
  """The task's train step: `train.train_step` with its loss, weights and trainable mask."""
  def step(state, batch):
    return train_lib.train_step(state, batch, loss_fn=task.loss_fn, optimizer=optimizer,
                                weight_fn=task.weight_fn, trainable=task.trainable)
  return step


def _target_text(summary: dict) -> str:
  """The final printout's line for train.target_val_loss."""
  target = summary["target_val_loss"]
  if summary["steps_to_target"] is None:
    return f"val loss never reached train.target_val_loss {target} in {summary['steps']} steps"
  return (f"val loss reached train.target_val_loss {target} at step "
          f"{summary['steps_to_target']}: {summary['tokens_to_target']:,.0f} tokens, "
          f"{summary['seconds_to_target']:.1f} s of training")


def _figures_text(figures: dict[str, float]) -> str:
  return ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in figures.items())


def _metrics_writer(setup: Setup, start_step: int) -> metrics_lib.MetricsWriter:
  """metrics.jsonl, holding a resumed run's records up to its checkpoint."""
  path = setup.workdir / "metrics.jsonl"
  history = metrics_lib.read_records(path, start_step) if start_step else []
  multihost.sync("jaxllm: metrics read")
  if not setup.main:
    return metrics_lib.MetricsWriter(os.devnull)
  metrics_lib.replace_records(path, history)  # the old file stays whole until the new one is
  if not start_step:  # a fresh run: no events of an earlier one
    shutil.rmtree(setup.workdir / "tensorboard", ignore_errors=True)
  writer = metrics_lib.MetricsWriter(path, setup.workdir / "tensorboard",
                                     purge_step=start_step + 1 if start_step else None)
  writer.records.extend(history)  # in the file now, and already in the event files
  return writer


def _save(setup: Setup, done: int, state, last_eval: dict | None, preemption) -> None:
  """A checkpoint when the policy says so, at the end, and on preemption (then stop)."""
  stop = preemption.reached(setup.manager, done)  # SIGTERM: save now, exit, resume later
  checkpoint_lib.save(setup.manager, done, state, setup.config, setup.task.tokenizer.to_json(),
                      val_loss=last_eval["val_loss"] if last_eval else None,
                      force=bool(stop) or done == setup.total_steps)
  if stop:
    setup.manager.wait_until_finished()
    raise Preempted(done, setup.manager.directory, stop)


def finish(setup: Setup, state, summary: dict, start_time: float) -> dict[str, Any]:
  """The run directory's parameters (every process writes its shards), the final report
  (every process computes it on the mesh, as every evaluation), then, on process 0, the loss
  curve and eval.json."""
  task = setup.task
  params, shardings = saved_params(setup, state.params)
  saved = task.export(params)
  for name, tree in saved.items():
    run_io.save_params(setup.workdir, tree, name=name)
  records, final = summary.pop("records"), summary.pop("final")
  figures = report.final_report(task, params, shardings, setup.mesh, setup.rules,
                                setup.config.train.batch_size, setup.workdir,
                                {**summary, **final}, setup.config.train.grad_accum)
  if not setup.main:
    return figures
  config = setup.config
  metrics_lib.plot_losses(records, setup.workdir / "loss.png", title=(
      f"{config.train.task}: {count_params(saved['params']) / 1e6:.2f}M parameters"))
  figures = report.write_figures(
      setup.workdir, {**figures, "wall_seconds": time.perf_counter() - start_time})
  print(f"step {summary['steps']}: {_figures_text(final)}; {summary['steps_per_s']:.1f} "
        f"steps/s (waiting for data {summary['input_wait']:.1%} of it), wall time "
        f"{figures['wall_seconds']:.0f} s; outputs in {setup.workdir}")
  if "target_val_loss" in summary:
    print(_target_text(summary))
  return figures


def saved_params(setup: Setup, params: Any) -> tuple[Any, Any]:
  """(the parameters as the run saves them, their shardings): adapters merged, on the mesh
  in the training parameters' shards; the training ones themselves without adapters."""
  if setup.task.saved_params is None:
    return params, setup.shardings.params
  by_path = {jax.tree_util.keystr(path): sharding_ for path, sharding_ in
             jax.tree_util.tree_leaves_with_path(setup.shardings.params)}
  shardings = jax.tree_util.tree_map_with_path(
      lambda path, _: by_path[jax.tree_util.keystr(path)],
      jax.eval_shape(setup.task.saved_params, params))
  return jax.jit(setup.task.saved_params, out_shardings=shardings)(params), shardings


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
        progress: bool = True, on_evaluation=None) -> dict[str, Any]:
  """Trains `config.train.task` as `config` says; returns the final figures (also printed).

  `on_evaluation(step, figures)` is called after each evaluation during training.
  """
  start_time = time.perf_counter()
  setup = set_up(config, pathlib.Path(workdir))
  with setup.manager:  # its threads end on errors too (a sweep runs many trials)
    state, start_step = initial_state(setup)
    state, summary = train_loop(setup, state, start_step, progress, on_evaluation)
  return finish(setup, state, summary, start_time)
