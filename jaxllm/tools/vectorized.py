"""Vectorised trials: K runs that differ only in optimizer hyperparameters, seeds and init
scale, in one jitted step.

`jax.vmap` runs the whole per-trial train step (loss, gradient, clipping, AdamW update) over
a leading trial axis of parameters and optimizer state; the hyperparameters are traced arrays
(a per-trial table of learning rates, one per step, and weight decay and Adam's betas as
scalars), so one compilation serves every value. Trials of one seed start from the same
initialisation and see the same batches, as separate runs with that seed do; trials that
differ in `train.seed` or `model.embedding_init_std` each have their own initialisation,
batches and dropout, as their separate runs do (the batches then stacked along the trial
axis too). Each trial
gets its own run directory (config.json, metrics.jsonl, TensorBoard events, eval.json,
params/). For small models, which leave the hardware idle, K trials cost far less than K
runs. With mesh.data = D devices the trial axis is split over them, K / D trials per device
(each trial's model whole on its device; mesh.fsdp and mesh.tensor stay 1). Not yet:
checkpoints and resume, model keys per trial.
"""

from __future__ import annotations

import copy
import pathlib
import time
import types
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxllm import config as config_lib
from jaxllm import tasks as tasks_lib
from jaxllm.errors import JaxllmError
from jaxllm.eval import report
from jaxllm.training import metrics as metrics_lib
from jaxllm.training import rundir as run_io
from jaxllm.training import sharding
from jaxllm.training import step as train_lib
from jaxllm.training.setup import total_steps

# The keys trials may differ in: optimizer hyperparameters, traced inside the step (the
# learning rate schedule's as its table), and those of TASK_KEYS.
KEYS = ("train.learning_rate", "train.min_learning_rate", "train.warmup_steps",
        "train.weight_decay", "train.beta1", "train.beta2", "train.seed",
        "model.embedding_init_std")
# Keys that give each trial a task of its own: its initialisation, batches, evaluation
# batches and dropout (the model computes the same).
TASK_KEYS = ("train.seed", "model.embedding_init_std")
_INTEGER_KEYS = ("train.seed", "train.warmup_steps")


def _trial_config(config: ml_collections.ConfigDict, values: dict) -> ml_collections.ConfigDict:
  trial = copy.deepcopy(config)
  for key, value in values.items():
    if key not in KEYS:
      raise JaxllmError(f"'{key}' cannot vary across vectorised trials (they can: "
                        f"{', '.join(KEYS)}); run the sweep without --vectorize")
    section, name = key.split(".")
    trial[section][name] = int(value) if key in _INTEGER_KEYS else float(value)
  return trial


def _value(config: ml_collections.ConfigDict, key: str) -> Any:
  section, name = key.split(".")
  return config[section][name]


def _hyperparameters(configs: Sequence[ml_collections.ConfigDict], total_steps: int) -> dict:
  """Per-trial arrays: the learning rate of every step (each trial's own schedule, as its
  separate run computes it) and weight decay, beta1, beta2."""
  tables = [jax.jit(jax.vmap(train_lib.learning_rate_schedule(c.train, total_steps)))(
      jnp.arange(total_steps)) for c in configs]
  return {"lr_table": jnp.stack(tables),
          **{name: jnp.asarray([c.train[name] for c in configs], jnp.float32)
             for name in ("weight_decay", "beta1", "beta2")}}


def _optimizer(train: ml_collections.ConfigDict, total_steps: int, trainable, hp: dict):
  """The trial's AdamW, built inside the vmapped step from its traced hyperparameters."""
  traced = types.SimpleNamespace(**{**train.to_dict(), "weight_decay": hp["weight_decay"],
                                    "beta1": hp["beta1"], "beta2": hp["beta2"]})
  return train_lib.make_optimizer(traced, total_steps, trainable,
                                  schedule=lambda count: hp["lr_table"][count])


def run(config: ml_collections.ConfigDict, trials: Sequence[dict],
        workdirs: Sequence[str | pathlib.Path]) -> list[dict[str, Any]]:
  """Trains len(trials) variants of `config` ({key: value} each) at once; returns each
  trial's final figures, also written to its workdir's eval.json."""
  start_time = time.perf_counter()
  if config.train.optimizer != "adamw":
    raise JaxllmError(f"vectorised trials train with AdamW only (its hyperparameters traced per "
                      f"trial), not train.optimizer={config.train.optimizer}; run the sweep "
                      f"without --vectorize")
  configs = [_trial_config(config, values) for values in trials]
  for trial_config in configs:
    config_lib.check_train(trial_config.train)
  task = tasks_lib.build(configs[0])
  train, count = configs[0].train, len(configs)
  # Trials of other seeds or init scales: a task each; else one task's batches for all.
  seeded = any(len({_value(c, key) for c in configs}) > 1 for key in TASK_KEYS)
  trial_tasks = [task, *map(tasks_lib.build, configs[1:])] if seeded else [task]
  total = total_steps(train, task)
  hp = _hyperparameters(configs, total)
  optimizer = train_lib.make_optimizer(train, total, task.trainable)  # the state's layout

  def trial_step(state, batch, hp):
    return train_lib.train_step(state, batch, loss_fn=task.loss_fn,
                                optimizer=_optimizer(train, total, task.trainable, hp),
                                weight_fn=task.weight_fn, trainable=task.trainable)

  split, whole = _trial_shardings(configs[0].mesh, count)
  batch_axis, batches = (0, split) if seeded else (None, whole)
  step_fn = jax.jit(jax.vmap(trial_step, in_axes=(0, batch_axis, 0)),
                    in_shardings=(split, batches, split), out_shardings=split, donate_argnums=0)
  eval_fn = jax.jit(jax.vmap(task.eval_fn, in_axes=(0, batch_axis)),
                    in_shardings=(split, batches), out_shardings=split)
  hp = jax.device_put(hp, split)

  def initial_state():
    params = [t.init_params() for t in trial_tasks] * (1 if seeded else count)
    seeds = jnp.asarray([c.train.seed + 1 for c in configs])
    return jax.vmap(lambda p, seed: train_lib.create_train_state(p, optimizer, seed))(
        jax.tree.map(lambda *xs: jnp.stack(xs), *params), seeds)

  state = jax.jit(initial_state, out_shardings=split)()
  writers = _open(configs, task, workdirs)
  last = _evaluate(trial_tasks, eval_fn, state.params, count)
  for k, writer in enumerate(writers):
    writer.write({"step": 0, **last[k]})
  devices = split.mesh.shape["data"]
  print(f"{count} vectorised trials of {', '.join(sorted(set().union(*trials)))}: "
        f"{total} steps" + (f", {count // devices} per device on {devices} devices"
                            if devices > 1 else ""))
  train_start = time.perf_counter()
  state, last = _loop(train, total, trial_tasks, step_fn, eval_fn, state, hp, writers, last)
  seconds = time.perf_counter() - train_start
  return [_finish(writer, workdir, jax.tree.map(lambda x, k=k: x[k], state.params),
                  {"steps": total, **last[k], "train_seconds": seconds, "vectorised_trials":
                   count, "wall_seconds": time.perf_counter() - start_time})
          for k, (writer, workdir) in enumerate(zip(writers, workdirs))]


def _loop(train, total: int, trial_tasks, step_fn, eval_fn, state, hp, writers, last):
  """Every step of every trial at once, logged and evaluated as the trainer does; returns
  (state, the last evaluation's figures of each trial)."""
  for step in range(total):
    state, metrics = step_fn(state, _stack([t.train_batch(step, None) for t in trial_tasks]),
                             hp)
    done = step + 1
    is_eval = config_lib.every(done, train.eval_every) or done == total
    if config_lib.every(done, train.log_every) or is_eval:
      host = jax.device_get(metrics)
      if is_eval:
        last = _evaluate(trial_tasks, eval_fn, state.params, len(writers))
      for k, writer in enumerate(writers):
        writer.write({"step": done, **{name: float(v[k]) for name, v in host.items()},
                      "lr": float(hp["lr_table"][k, step]), **(last[k] if is_eval else {})})
  return state, last


def _trial_shardings(mesh_config: ml_collections.ConfigDict, count: int):
  """(the trial axis split over mesh.data, replicated): the state's and the batches'."""
  if (mesh_config.fsdp, mesh_config.tensor) != (1, 1):
    raise JaxllmError("vectorised trials split the trial axis over mesh.data only; set "
                      "mesh.fsdp=1 and mesh.tensor=1")
  mesh = sharding.make_mesh(mesh_config)
  if count % mesh.shape["data"]:
    raise JaxllmError(f"{count} vectorised trials do not split over mesh.data="
                      f"{mesh.shape['data']} devices; make --vectorize a multiple of it")
  return NamedSharding(mesh, P("data")), NamedSharding(mesh, P())


def _open(configs, task, workdirs) -> list[metrics_lib.MetricsWriter]:
  writers = []
  for trial_config, workdir in zip(configs, workdirs):
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    run_io.save_run_files(workdir, trial_config, task.tokenizer)
    (workdir / "metrics.jsonl").unlink(missing_ok=True)
    writers.append(metrics_lib.MetricsWriter(workdir / "metrics.jsonl", workdir / "tensorboard"))
  return writers


def _stack(trees: list) -> Any:
  """One tree from one (a single trial's, shared by all) or from one per trial, stacked."""
  return trees[0] if len(trees) == 1 else jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _evaluate(trial_tasks: list[tasks_lib.Task], eval_fn, params, count: int
              ) -> list[dict[str, float]]:
  """Every trial's figures on its evaluation batches (sums / count, as the trainer)."""
  figures: list[dict[str, float]] = [{} for _ in range(count)]
  for split in ("train", "val"):
    means = tasks_lib.eval_means(
        eval_fn(params, _stack(list(batches)))
        for batches in zip(*(t.eval_batches(split) for t in trial_tasks)))
    for k in range(count):
      figures[k].update({f"{split}_{name}": float(value[k]) for name, value in means.items()})
  return figures


def _finish(writer, workdir, params, figures: dict) -> dict:
  writer.close()
  workdir = pathlib.Path(workdir)
  run_io.save_params(workdir, params)
  return report.write_figures(workdir, figures)
