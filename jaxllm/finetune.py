"""`jaxllm finetune`: a GPT backbone plus a head, trained on a classification or instruction task.

The pure parts: which parameters train (`trainable_mask`, a pytree of bools from a config
string, turned into `optax.multi_transform` with `set_to_zero` for the rest) and
`train_step(state, batch) -> (state, metrics)` over any `loss_fn(params, batch, rng)`. The
loop (`run`) loads the backbone (a run directory or a fresh init), the task's data and
head, trains for `train.epochs`, and saves a plain run directory: LoRA adapters merged,
`params/` the GPT (so `jaxllm generate` and `run_io.load_run` read it), `head/` the head.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import re
import time
from typing import Any, Callable, Iterator

import jax
import ml_collections
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxllm import config as config_lib
from jaxllm import evaluate
from jaxllm import heads
from jaxllm import lora
from jaxllm import metrics as metrics_lib
from jaxllm import run_io
from jaxllm import tasks
from jaxllm import tokenizer as tokenizer_lib
from jaxllm import train as train_lib
from jaxllm.data import classification
from jaxllm.data import instruction
from jaxllm.errors import JaxllmError
from jaxllm.model import GPT, count_params, init_params

TASKS = ("classify", "instruct")


# --- What trains --------------------------------------------------------------------------


def _groups(n_layer: int) -> dict[str, str]:
  """Named parts of {"backbone", "head", "lora"} as regexes on "/"-joined parameter paths."""
  return {
      "all": r"",
      "backbone": r"^backbone/",
      "head": r"^head/|^backbone/lm_head/",
      "embeddings": r"^backbone/(wte|wpe)/",
      "final_norm": r"^backbone/ln_f/",
      "last_block": rf"^backbone/blocks_{n_layer - 1}/",
      "lora": r"^lora/",
  }


def parameter_paths(params: Any) -> Any:
  """A pytree like `params` holding each leaf's path, "backbone/blocks_0/attn/qkv/kernel"."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "/".join(str(getattr(k, "key", k)) for k in path), params)


def trainable_mask(params: Any, spec: str, n_layer: int) -> Any:
  """True for the leaves `spec` selects: comma-separated group names or path regexes."""
  groups = _groups(n_layer)
  paths = jax.tree.leaves(parameter_paths(params))
  patterns = []
  for item in (s.strip() for s in spec.split(",")):
    if not item:
      continue
    pattern = groups.get(item, item)
    try:
      compiled = re.compile(pattern)
    except re.error as e:
      raise JaxllmError(f"finetune.trainable: '{item}' is neither a group "
                        f"({', '.join(groups)}) nor a valid regex ({e})") from None
    if not any(compiled.search(p) for p in paths):
      raise JaxllmError(f"finetune.trainable: '{item}' selects no parameter (groups: "
                        f"{', '.join(groups)}; or a regex on paths like {paths[0]})")
    patterns.append(compiled)
  if not patterns:
    raise JaxllmError("finetune.trainable is empty (e.g. all, head, or head,last_block,final_norm)")
  return jax.tree.map(lambda p: any(c.search(p) for c in patterns), parameter_paths(params))


def make_optimizer(train: ml_collections.ConfigDict, total_steps: int,
                   mask: Any) -> optax.GradientTransformation:
  """train.make_optimizer's AdamW on the masked leaves; the others never move."""
  labels = jax.tree.map(lambda t: "train" if t else "freeze", mask)
  return optax.multi_transform(
      {"train": train_lib.make_optimizer(train, total_steps), "freeze": optax.set_to_zero()},
      labels)


def count_trainable(params: Any, mask: Any) -> int:
  return sum(int(x.size) for x, t in zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if t)


# --- The step -----------------------------------------------------------------------------


def train_step(state: train_lib.TrainState, batch: dict[str, jax.Array], *,
               loss_fn: Callable, optimizer: optax.GradientTransformation, mask: Any
               ) -> tuple[train_lib.TrainState, dict[str, jax.Array]]:
  """One optimizer step of `loss_fn(params, batch, rng) -> (loss, aux)`."""
  rng, step_rng = jax.random.split(state.rng)
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, step_rng)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # Only the trained leaves' gradients: the frozen ones are never used, so XLA drops them.
  trained = [g for g, t in zip(jax.tree.leaves(grads), jax.tree.leaves(mask)) if t]
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
  return new_state, {"loss": loss, "grad_norm": optax.tree.norm(trained), **aux}


# --- Backbone, saving and loading ---------------------------------------------------------


def load_backbone(config: ml_collections.ConfigDict) -> tuple[GPT, Any, tokenizer_lib.Tokenizer]:
  """The GPT to finetune: `finetune.init_from`'s run directory, or a fresh one from `model`.

  config.model and config.data.tokenizer are updated to what was loaded (for config.json).
  """
  if config.finetune.init_from:
    if not pathlib.Path(config.finetune.init_from, "config.json").is_file():
      raise JaxllmError(f"finetune.init_from: {config.finetune.init_from} is not a run directory "
                        f"(make one with `jaxllm convert` or `jaxllm train`, or set "
                        f"--config.finetune.init_from='' to start from scratch)")
    _, model, params, tokenizer = run_io.load_run(config.finetune.init_from)
    model = GPT(dataclasses.replace(model.config, dropout=float(config.model.dropout)))
  else:
    if config.data.tokenizer == "char":
      raise JaxllmError("a character tokenizer is built from a corpus: finetune from a run "
                        "(finetune.init_from) or set data.tokenizer to a tiktoken encoding")
    tokenizer = tokenizer_lib.get_tokenizer(config.data.tokenizer)
    model = GPT(config_lib.model_config(config.model, tokenizer.vocab_size))
    params = init_params(model, jax.random.key(config.train.seed))
  with config.ignore_type():
    for field in dataclasses.fields(model.config):
      if field.name in config.model:
        config.model[field.name] = getattr(model.config, field.name)
    config.data.tokenizer = tokenizer.name
  return model, params, tokenizer


def save_finetuned(workdir: pathlib.Path, config: ml_collections.ConfigDict,
                   tokenizer: tokenizer_lib.Tokenizer, params: Any) -> None:
  """config.json, tokenizer.json, params/ (the GPT, as `jaxllm train` writes it), head/."""
  run_io.save_run_files(workdir, config, tokenizer)
  run_io.save_params(workdir, params["backbone"])
  if jax.tree.leaves(params["head"]):
    run_io.save_params(workdir, params["head"], name="head")


def load_finetuned(workdir: str | pathlib.Path, overrides=()) -> tuple[
    ml_collections.ConfigDict, GPT, Any, tokenizer_lib.Tokenizer]:
  """(config, backbone, {"backbone", "head"}, tokenizer) of a `jaxllm finetune` run."""
  workdir = pathlib.Path(workdir)
  config, model, backbone_params, tokenizer = run_io.load_run(workdir)
  config_lib.apply_overrides(config, overrides)
  head: Any = {}
  if config.finetune.task == "classify":
    if not (workdir / "head").is_dir():
      raise JaxllmError(f"{workdir / 'head'} not found (is {workdir} a finished `jaxllm "
                        f"finetune` run?)")
    num_classes = len(config.classifier.labels.split(","))
    target = run_io.on_one_device(jax.eval_shape(
        lambda: heads.classifier_init(jax.random.key(0), model.config.d_model, num_classes)))
    head = run_io.load_params(workdir, target, name="head",
                              fix=f"classifier.labels in {workdir / 'config.json'} and the "
                                  f"head disagree (was the folder edited by hand?)")
  return config, model, {"backbone": backbone_params, "head": head}, tokenizer


# --- The run ------------------------------------------------------------------------------


@dataclasses.dataclass
class _Task:
  """What the loop needs from a task: batches, the loss, periodic and final evaluation."""

  batches_per_epoch: int
  epoch_batches: Callable[[int], Iterator[dict[str, np.ndarray]]]
  loss_fn: Callable
  evaluate: Callable[[Any, int], dict[str, float]]  # (params, max_batches) -> figures


def _classify_task(config, model, tokenizer, rng, lora_scale, deterministic):
  data = classification.load(config.classifier, tokenizer, model.config.context_length)
  with config.ignore_type():  # config.json records what ran: the classes and the length
    config.classifier.labels = ",".join(data.labels)
    config.classifier.max_length = data.max_length
  head = heads.classifier_init(rng, model.config.d_model, len(data.labels))
  batch_size, seed = config.train.batch_size, config.train.seed
  sizes = ", ".join(f"{k} {len(v['label_B'])}" for k, v in data.splits.items())
  print(f"data: {sizes} examples, classes {data.labels}, padded to {data.max_length} tokens "
        f"(pad id {data.pad_id})")

  def evaluate_fn(params, max_batches):
    figures = {}
    for split in ("train", "val"):
      result = evaluate.classify_split(params, data.splits[split], batch_size, backbone=model,
                                       lora_scale=lora_scale, max_batches=max_batches)
      figures[f"{split}_loss"] = result["loss"]
      figures[f"{split}_accuracy"] = result["accuracy"]
    return figures

  task = _Task(
      batches_per_epoch=classification.num_batches(data.splits["train"], batch_size, True),
      epoch_batches=lambda epoch: classification.batches(
          data.splits["train"], batch_size, seed=seed, epoch=epoch, drop_last=True),
      loss_fn=functools.partial(tasks.classification_loss, backbone=model,
                                lora_scale=lora_scale, deterministic=deterministic),
      evaluate=evaluate_fn)
  return task, head


def _instruct_task(config, model, tokenizer, lora_scale, deterministic):
  records, encoded = instruction.load(config.instruct, tokenizer, config.train.seed)
  print(f"data: {', '.join(f'{k} {len(v)}' for k, v in records.items())} records "
        f"({config.instruct.template} template, prompt masked: {config.instruct.mask_prompt})")
  shape = instruction.batch_options(config.instruct, model.config.context_length, tokenizer.eot_id)
  sampler = instruction.Batches(encoded["train"], config.train.batch_size, config.train.seed,
                                config.instruct.bucket_batches)

  def evaluate_fn(params, max_batches):
    return {f"{split}_loss": evaluate.instruction_loss(
        params, encoded[split], config.train.batch_size, backbone=model, lora_scale=lora_scale,
        max_batches=max_batches, **shape) for split in ("train", "val")}

  task = _Task(
      batches_per_epoch=sampler.batches_per_epoch,
      epoch_batches=lambda epoch: (instruction.make_batch(encoded["train"], rows, **shape)
                                   for rows in sampler.epoch(epoch)),
      loss_fn=functools.partial(tasks.instruction_loss, backbone=model, lora_scale=lora_scale,
                                deterministic=deterministic),
      evaluate=evaluate_fn)
  return task, {}


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
        progress: bool = True) -> dict[str, Any]:
  """Finetunes as `config` says; writes the run directory and eval.json; returns the figures."""
  start_time = time.perf_counter()
  workdir = pathlib.Path(workdir)
  train = config.train
  if config.finetune.task not in TASKS:
    raise JaxllmError(f"finetune.task must be one of {', '.join(TASKS)}, "
                      f"got '{config.finetune.task}'")
  if train.epochs <= 0 and train.steps <= 0:
    raise JaxllmError("set train.epochs (or train.steps) to a positive number")
  if train.grad_accum != 1:
    raise JaxllmError("jaxllm finetune takes whole batches: set train.grad_accum=1")
  model, backbone_params, tokenizer = load_backbone(config)
  if getattr(model.config, "scan_layers", False) and (
      config.lora.rank > 0 or "last_block" in config.finetune.trainable):
    raise JaxllmError("LoRA and trainable=last_block need per-layer parameters: set "
                      "model.scan_layers=false")
  head_rng, lora_rng = jax.random.split(jax.random.key(train.seed + 1))
  lora_scale = lora.scale(config.lora.alpha, config.lora.rank) if config.lora.rank > 0 else 0.0
  deterministic = model.config.dropout == 0.0
  if config.finetune.task == "classify":
    task, head = _classify_task(config, model, tokenizer, head_rng, lora_scale, deterministic)
  else:
    task, head = _instruct_task(config, model, tokenizer, lora_scale, deterministic)

  params = {"backbone": backbone_params, "head": head}
  if config.lora.rank > 0:
    params["lora"] = lora.init(lora_rng, params, lora.parse_targets(config.lora.targets),
                               config.lora.rank)
  mask = trainable_mask(params, config.finetune.trainable, model.config.n_layer)
  if "lora" in params and not any(jax.tree.leaves(mask["lora"])):
    raise JaxllmError("lora.rank > 0 but finetune.trainable does not train the adapters "
                      "(add 'lora')")
  total_steps = train.epochs * task.batches_per_epoch if train.epochs > 0 else train.steps
  with config.ignore_type():
    train.steps = total_steps
  optimizer = make_optimizer(train, total_steps, mask)
  state = train_lib.create_train_state(params, optimizer, seed=train.seed + 2)
  n_trainable = count_trainable(params, mask)
  adapters = f", LoRA rank {config.lora.rank}" if "lora" in params else ""
  source = f"from {config.finetune.init_from}" if config.finetune.init_from else "from scratch"
  print(f"model: {count_params(params):,} parameters, {n_trainable:,} trained "
        f"({config.finetune.trainable}{adapters}); {source}; {total_steps} steps of batch "
        f"{train.batch_size}")

  workdir.mkdir(parents=True, exist_ok=True)
  for stale in ("metrics.jsonl", "eval.json", evaluate.RESPONSES_FILE):
    (workdir / stale).unlink(missing_ok=True)
  writer = metrics_lib.MetricsWriter(workdir / "metrics.jsonl")
  step_fn = jax.jit(functools.partial(train_step, loss_fn=task.loss_fn, optimizer=optimizer,
                                      mask=mask), donate_argnums=0)
  schedule = train_lib.learning_rate_schedule(train, total_steps)

  eval_seconds = 0.0

  def log_eval(step: int, bar=None) -> dict[str, float]:
    nonlocal eval_seconds
    eval_start = time.perf_counter()
    figures = task.evaluate(state.params, train.eval_batches)
    eval_seconds += time.perf_counter() - eval_start
    writer.write({"step": step, **figures})
    (bar.write if bar else print)(f"step {step}: " + ", ".join(
        f"{k.replace('_', ' ')} {v:.4f}" for k, v in figures.items()))
    return figures

  first = log_eval(0)
  eval_seconds = 0.0  # from here on, periodic evaluation inside the training time
  bar = tqdm(total=total_steps, desc="finetune", unit="step", disable=not progress,
             dynamic_ncols=True)
  train_start = time.perf_counter()
  step = 0
  while step < total_steps:
    for batch in task.epoch_batches(step // task.batches_per_epoch):
      state, step_metrics = step_fn(state, batch)
      step += 1
      is_eval = (step % train.eval_every == 0 or step % task.batches_per_epoch == 0
                 or step == total_steps)
      if step % train.log_every == 0 or is_eval:
        loss = float(step_metrics["loss"])
        if not math.isfinite(loss):
          bar.close()
          writer.close()
          raise JaxllmError(f"loss became {loss} at step {step} (lower train.learning_rate)")
        writer.write({"step": step, "loss": loss, "lr": float(schedule(step - 1)),
                      "grad_norm": float(step_metrics["grad_norm"])})
        bar.set_postfix(loss=f"{loss:.4f}")
      if is_eval:
        log_eval(step, bar)
      bar.update(1)
      if step == total_steps:
        break
  bar.close()
  train_seconds = time.perf_counter() - train_start - eval_seconds
  writer.close()
  metrics_lib.plot_losses(writer.records, workdir / "loss.png",
                          title=f"finetune {config.finetune.task}")

  # Export: adapters merged into plain weights, the run directory `load_finetuned` reads.
  merged = jax.device_get(tasks.effective_params(state.params, lora_scale))
  save_finetuned(workdir, config, tokenizer, merged)
  figures = evaluate.evaluate_finetuned(config, model, merged, tokenizer, workdir,
                                        progress=progress, extra={
      "steps": total_steps, "trainable_params": n_trainable,
      "total_params": count_params(params), "initial_val_loss": first["val_loss"],
      "train_seconds": train_seconds})
  figures = evaluate.write_figures(workdir, {"wall_seconds": time.perf_counter() - start_time})
  print(f"figures: {json.dumps({k: v for k, v in figures.items() if not isinstance(v, dict)})}")
  print(f"outputs in {workdir}")
  return figures
