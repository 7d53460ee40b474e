"""A run's set-up, before its first step: the task, mesh and shardings, optimizer and checkpoint
manager (`set_up`), the state restored or initialised (`initial_state`), and the start-up lines
(`describe`)."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax
import ml_collections
import optax

from jaxllm import config as config_lib
from jaxllm import tasks as tasks_lib
from jaxllm.errors import JaxllmError
from jaxllm.eval import responses
from jaxllm.models.gpt import count_params
from jaxllm.training import checkpoint as checkpoint_lib
from jaxllm.training import multihost, sharding
from jaxllm.training import rundir as run_io
from jaxllm.training import step as train_lib


@dataclasses.dataclass
class Setup:
  """What the set-up builds and every later stage reads."""

  config: ml_collections.ConfigDict
  workdir: pathlib.Path
  task: tasks_lib.Task
  mesh: jax.sharding.Mesh
  rules: Any
  optimizer: optax.GradientTransformation
  shardings: train_lib.TrainState
  manager: Any  # orbax CheckpointManager
  total_steps: int
  train_rows: slice  # this process's rows of each microbatch
  main: bool  # process 0 prints and writes; every process computes


def log(setup: Setup, message: str, bar=None) -> None:
  if setup.main:
    (bar.write if bar is not None else print)(message)


def total_steps(train: ml_collections.ConfigDict, task: tasks_lib.Task) -> int:
  """train.steps, or train.epochs passes over the task's batches."""
  if train.epochs <= 0:
    return int(train.steps)
  if task.batches_per_epoch is None:
    raise JaxllmError("train.epochs needs batches in epochs (data.sampling=sliding for "
                      "pretraining: random windows have none); set train.steps instead")
  return int(train.epochs) * task.batches_per_epoch


def set_up(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> Setup:
  """The task, the mesh and shardings, the optimizer and the checkpoint manager."""
  train = config.train
  config_lib.check_train(train)
  multihost.initialize()  # before anything touches a device
  task = tasks_lib.build(config)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_rules(config.mesh.rules)
  config.mesh.rules = rules  # config.json records the whole table
  sharding.check_batch(train.batch_size, train.grad_accum, mesh, rules)
  abstract_params = jax.eval_shape(task.init_params)
  sharding.check_divisible(abstract_params, task.param_axes, mesh, rules)
  with config.ignore_type():
    train.steps = steps = total_steps(train, task)
  optimizer = train_lib.make_optimizer(train, steps, task.trainable)
  shardings = sharding.state_shardings(abstract_params, task.param_axes, optimizer, mesh, rules)

  main = multihost.is_main()
  workdir.mkdir(parents=True, exist_ok=True)  # every process: Orbax saves are collective
  if not config.checkpoint.resume and main:
    checkpoint_lib.remove(workdir / "checkpoints")  # start over
  multihost.sync("jaxllm: old checkpoints removed")  # before any process opens the folder
  manager = checkpoint_lib.make_manager(workdir / "checkpoints", config.checkpoint)
  if main:
    run_io.save_run_files(workdir, config, task.tokenizer)
    for stale in ("eval.json", responses.RESPONSES_FILE):  # outputs of a finished run
      (workdir / stale).unlink(missing_ok=True)
  microbatch = train.batch_size // train.grad_accum
  return Setup(
      config=config, workdir=workdir, task=task, mesh=mesh, rules=rules, optimizer=optimizer,
      shardings=shardings, manager=manager, total_steps=steps,
      train_rows=multihost.process_rows(sharding.batch_sharding(mesh, rules, 1, ndim=2),
                                        (train.grad_accum, microbatch), axis=1),
      main=main)


def initial_state(setup: Setup) -> tuple[train_lib.TrainState, int]:
  """(state, first step): the latest checkpoint's, or fresh, with train.init_from's weights.

  Parameters are created in their shards: FSDP parameters are never whole on one device. A
  run holding a checkpoint restores onto the abstract state (`jax.eval_shape` of the init,
  with the state's shardings): every byte comes from the checkpoint, so nothing is
  initialised and train.init_from is not read again (gigabytes at 1B parameters).
  """
  task, train = setup.task, setup.config.train

  def create(params):
    return train_lib.create_train_state(params, setup.optimizer, seed=train.seed + 1)

  if setup.manager.latest_step() is not None:
    # A checkpoint saved on another mesh is resharded onto this one's shardings.
    target = checkpoint_lib.abstract_state(lambda: create(task.init_params()), setup.shardings)
    return _restored(setup, target)
  params = jax.jit(task.init_params, out_shardings=setup.shardings.params)()
  if train.init_from:  # another run's weights (`jaxllm train`, or GPT-2 via `jaxllm convert`)
    for path in task.pretrained_into:
      loaded = run_io.load_params(train.init_from,
                                  checkpoint_lib.abstract_like(_subtree(params, path)),
                                  cast_floats=True)
      params = _replace_subtree(params, path, loaded)
  return jax.jit(create, out_shardings=setup.shardings)(params), 0


def _restored(setup: Setup, target: train_lib.TrainState) -> tuple[train_lib.TrainState, int]:
  """The latest intact checkpoint restored onto `target`, and its step."""
  state, step = checkpoint_lib.restore(setup.manager, target)
  if step > setup.total_steps:
    raise JaxllmError(f"the checkpoint in {setup.manager.directory} is at step {step}, past "
                      f"this run's {setup.total_steps} steps; raise train.steps, or start over "
                      f"with --config.checkpoint.resume=false")
  log(setup, f"resuming from step {step} in {setup.manager.directory} "
             f"(--config.checkpoint.resume=false starts over)")
  return state, step


def _subtree(tree: Any, path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def _replace_subtree(tree: Any, path: tuple[str, ...], value: Any) -> Any:
  if not path:
    return value
  return {**tree, path[0]: _replace_subtree(tree[path[0]], path[1:], value)}


def describe(setup: Setup, state: train_lib.TrainState, peak_flops: float,
             flops_per_token: float, length: int) -> None:
  """The start-up lines: model, data, mesh and memory per device, batch, MFU's yardstick."""
  cfg, train, mesh = setup.task.model.config, setup.config.train, setup.mesh
  kv = ""
  if isinstance(cfg, config_lib.EncoderConfig):
    kind = (f"bidirectional encoder, {'pre' if cfg.pre_norm else 'post'}-LayerNorm, "
            f"{cfg.type_vocab_size} segments, {cfg.dtype}")
  else:
    kv = f" ({cfg.kv_heads} kv)" if cfg.kv_heads != cfg.n_head else ""
    matmuls = "" if cfg.matmul_dtype == cfg.dtype else f", {cfg.matmul_dtype} matmuls"
    kind = f"{cfg.norm}, {cfg.position} positions, {cfg.mlp}, {cfg.dtype}{matmuls}"
  log(setup, f"model: {count_params(state.params):,} parameters ({cfg.n_layer} layers, "
             f"{cfg.n_head} heads{kv}, d_model {cfg.d_model}, context {cfg.context_length}, "
             f"vocab {cfg.vocab_size}, {kind}); task {train.task}"
             f"{', from ' + train.init_from if train.init_from else ''}")
  log(setup, f"data: {setup.task.description}")
  mib = {name: sharding.bytes_per_device(getattr(state, name), getattr(setup.shardings, name))
         / 2**20 for name in ("params", "opt_state")}
  log(setup, f"mesh: {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} "
             f"device(s) in {jax.process_count()} process(es); per device: parameters "
             f"{mib['params']:.2f} MiB, optimizer state {mib['opt_state']:.2f} MiB")
  per_device = train.batch_size // sharding.data_parallel_size(mesh, setup.rules)
  log(setup, f"batch: {train.batch_size} x {length} tokens ({train.grad_accum} "
             f"microbatch(es)), {per_device} sequences per device; {setup.total_steps} steps")
  reference = " + the reference's 2N + 4 L d T" if setup.task.reference_forward else ""
  log(setup, f"MFU: {flops_per_token / 1e6:.2f} MFLOP/token (6N + 12 L d T{reference}; T = "
             f"{length} in the first batch, each batch at its own) against "
             f"{peak_flops / 1e9:.0f} GFLOP/s per device "
             f"({'given' if train.peak_flops else 'measured matmul'})")
