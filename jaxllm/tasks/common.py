"""What every task is made of: the `Task` record, the backbone and its starting weights, the
finetuning parameter tree with its logical axes and trainable mask, and batch helpers.

A finetuned model's parameters are one pytree `{"backbone": GPT or encoder, "head": head}`, plus
`"lora"` with adapters and `"reference"` (a frozen copy of the starting backbone) for DPO.
Which leaves train is an optax mask over that tree (`trainable_mask`), never a code change.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import re
from typing import Any, Callable, Iterable

import jax
import ml_collections
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxllm import config as config_lib
from jaxllm import data as data_lib
from jaxllm.data import tokenizer as tokenizer_lib
from jaxllm.errors import JaxllmError
from jaxllm.models import lora
from jaxllm.models.bert import Encoder
from jaxllm.models.gpt import GPT, init_params, logical_axes, param_dtype
from jaxllm.tasks import losses
from jaxllm.training import multihost
from jaxllm.training import rundir as run_io
from jaxllm.training import step as train_lib

Params = Any
Batch = dict[str, np.ndarray]


@dataclasses.dataclass
class Task:
  """What the trainer needs from a task; the mesh, optimizer, loop, logs, checkpoints and
  resume are the trainer's.

  Batches are dicts of numpy arrays and pure functions of (seed, step): `train_batch(step,
  rows)` gives A x M x ... arrays (A = train.grad_accum microbatches of M rows; with `rows`,
  only those rows of each microbatch, the ones this process's devices hold), and
  `eval_batches(split)` the batches of train.batch_size rows (padded with weight-0 rows) that
  every evaluation sees.

  The final report (eval.json) is an evaluation too, compiled on the mesh with the state's
  shardings and run by every process: `report_fn` (default eval_fn) over `report_batches(split)`
  (every batch of the split) for each of `report_splits`, each split's sums made figures by
  `report_figures(split, sums)` (default: "<split>_<name>" = sum / count); then `report` adds
  what is not a sum over batches (a text sample, generated responses) and writes its files on
  process 0.
  """

  model: Backbone  # a GPT or an encoder, whose config goes into config.json
  tokenizer: tokenizer_lib.Tokenizer
  init_params: Callable[[], Params]  # fresh parameters; traced, so created in their shards
  param_axes: Params  # logical axes (PartitionSpecs) like the parameters
  loss_fn: Callable  # (params, microbatch, rng) -> (mean loss, {name: mean}), see train_step
  eval_fn: Callable  # (params, batch) -> {"count": n, name: sum}: figures are sum / count
  train_batch: Callable[[int, slice | None], Batch]
  eval_batches: Callable[[str], Iterable[Batch]]
  token_key: str  # the batch entry whose size counts the tokens a step sees
  export: Callable[[Params], dict[str, Params]]  # what to save: folder name -> parameters
  report: Callable[[pathlib.Path, Params, dict], dict]  # (workdir, saved params, figures)
  weight_fn: Callable = train_lib.rows_weight  # items a microbatch's mean is over
  trainable: Params | None = None  # bools like the parameters; None = all train
  pretrained_into: tuple[tuple[str, ...], ...] = ((),)  # subtrees train.init_from fills
  batches_per_epoch: int | None = None  # None: batches do not come in epochs
  description: str = ""  # the data line printed at start-up
  # Whether the loss multiplies by the vocabulary (an LM head): else the token embedding is
  # a lookup only, and MFU's 6N leaves it out.
  lm_head: bool = True
  # DPO: a frozen reference's forward pass over every token too, which MFU counts.
  reference_forward: bool = False
  report_splits: tuple[str, ...] = ()
  report_batches: Callable[[str], Iterable[Batch]] | None = None
  report_fn: Callable | None = None
  report_figures: Callable[[str, dict[str, np.ndarray]], dict] | None = None
  # The parameters as saved (adapters merged): what the report and `jaxllm eval` evaluate.
  # None: the training parameters as they are.
  saved_params: Callable[[Params], Params] | None = None


def eval_sums(results: Iterable[dict[str, Any]]) -> dict[str, np.ndarray]:
  """A split's sums from its batches' `eval_fn` results, added up in float64 (arrays stay
  arrays: one figure per vectorised trial, a confusion matrix)."""
  sums: dict[str, Any] = {}
  for result in results:
    for name, value in result.items():
      sums[name] = sums.get(name, 0.0) + np.asarray(value, np.float64)
  return sums


def sum_means(sums: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Each sum over the summed "count"."""
  count = np.maximum(sums.get("count", 0.0), 1e-9)
  return {name: value / count for name, value in sums.items() if name != "count"}


def eval_means(results: Iterable[dict[str, Any]]) -> dict[str, np.ndarray]:
  """The figures of a split from its batches' `eval_fn` results: each sum over the count."""
  return sum_means(eval_sums(results))


def split_figures(split: str, sums: dict[str, np.ndarray]) -> dict[str, float]:
  """"<split>_<name>": sum / count, the figures of an evaluated split."""
  return {f"{split}_{name}": float(value) for name, value in sum_means(sums).items()}


# --- The backbone -------------------------------------------------------------------------



Backbone = GPT | Encoder
BackboneConfig = config_lib.ModelConfig | config_lib.EncoderConfig


def pretrained_run(config: ml_collections.ConfigDict
                   ) -> tuple[BackboneConfig, tokenizer_lib.Tokenizer] | None:
  """train.init_from's architecture and tokenizer (from its config.json and tokenizer.json)."""
  if not config.train.init_from:
    return None
  path = pathlib.Path(config.train.init_from)
  if not (path / "config.json").is_file() or not (path / "tokenizer.json").is_file():
    raise JaxllmError(f"train.init_from: {path} is not a run directory (make one with `jaxllm "
                      f"convert` or `jaxllm train`, or set --config.train.init_from='' to start "
                      f"from scratch)")
  run_config = config_lib.from_dict(json.loads((path / "config.json").read_text()))
  tokenizer = tokenizer_lib.from_json(json.loads((path / "tokenizer.json").read_text()))
  return run_io.resolve_model(run_config.model, tokenizer), tokenizer


def backbone(config: ml_collections.ConfigDict, tokenizer: tokenizer_lib.Tokenizer | None = None
             ) -> tuple[Backbone, tokenizer_lib.Tokenizer]:
  """The GPT or encoder (model.architecture) to train and its tokenizer: train.init_from's,
  or `config.model` over `tokenizer` (default: data.tokenizer). config.model and
  data.tokenizer then record them."""
  run = pretrained_run(config)
  if run is not None:
    architecture, tokenizer = run
    kind = config_lib.architecture_of(architecture)
    if config.model.architecture not in (None, kind):
      raise JaxllmError(f"model.architecture={config.model.architecture}, but train.init_from "
                        f"{config.train.init_from} holds a {kind} model (its architecture is "
                        f"the run's: leave model.architecture unset)")
    runtime = {key: config.model[key] for key in config_lib.RUNTIME_KEYS
               if hasattr(architecture, key)}
    model_config = dataclasses.replace(architecture, **runtime)
    config_lib.resolve(config.model, architecture.vocab_size)  # this run's keys are valid
  else:
    if tokenizer is None:
      if config.data.tokenizer == "char":
        raise JaxllmError("a character tokenizer is built from a corpus: start from a run "
                          "(train.init_from) or set data.tokenizer to a tiktoken encoding")
      tokenizer = tokenizer_lib.get_tokenizer(config.data.tokenizer)
    model_config = run_io.resolve_model(config.model, tokenizer)
  with config.ignore_type():
    config.model.architecture = config_lib.architecture_of(model_config)  # what ran
    for field in dataclasses.fields(model_config):
      if field.name in config.model:
        config.model[field.name] = getattr(model_config, field.name)
    config.data.tokenizer = tokenizer.name
  return run_io.build_model(model_config), tokenizer


def require_decoder(model: Backbone, task: str, instead: str = "") -> None:
  if isinstance(model, Encoder):
    other = f" (an encoder trains with train.task={instead})" if instead else ""
    raise JaxllmError(f"train.task={task} needs a GPT (decoder), but model.architecture is "
                      f"bert{other}")


def token_data(config: ml_collections.ConfigDict) -> data_lib.TokenData:
  """The corpus's tokens (lm and mlm). Process 0 tokenizes and caches first, so processes
  sharing a disk never write one cache at once; if it fails (a bad corpus), so do the others,
  with its message."""
  run = pretrained_run(config)
  context_length = (run[0] if run else config_lib.resolve(config.model, 1)).context_length
  load = functools.partial(data_lib.load_token_data, config.data, context_length,
                           tokenizer=run[1] if run else None)
  return multihost.main_first(load)


# --- Finetuning parameters ----------------------------------------------------------------


def _groups(n_layer: int) -> dict[str, str]:
  """Named parts of {"backbone", "head", "lora"} as regexes on "/"-joined parameter paths."""
  return {
      "all": r"^(?!reference/)",
      "backbone": r"^backbone/",
      "head": r"^head/|^backbone/lm_head/",
      "embeddings": r"^backbone/(wte|wpe|wtt)/",
      "final_norm": r"^backbone/ln_f/",
      "last_block": rf"^backbone/blocks_{n_layer - 1}/",
      "lora": r"^lora/",
  }


def parameter_paths(params: Params) -> Params:
  """A pytree like `params` holding each leaf's path, "backbone/blocks_0/attn/qkv/kernel"."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "/".join(str(getattr(k, "key", k)) for k in path), params)


def trainable_mask(params: Params, spec: str, n_layer: int) -> Params:
  """True for the leaves `spec` selects: comma-separated group names or path regexes. The
  DPO reference never trains."""
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
      raise JaxllmError(f"train.trainable: '{item}' is neither a group "
                        f"({', '.join(groups)}) nor a valid regex ({e})") from None
    if not any(compiled.search(p) for p in paths):
      raise JaxllmError(f"train.trainable: '{item}' selects no parameter (groups: "
                        f"{', '.join(groups)}; or a regex on paths like {paths[0]})")
    patterns.append(compiled)
  if not patterns:
    raise JaxllmError("train.trainable is empty (e.g. all, head, or head,last_block,final_norm)")
  return jax.tree.map(lambda p: not p.startswith("reference/") and any(
      c.search(p) for c in patterns), parameter_paths(params))


def count_trainable(params: Params, mask: Params) -> int:
  return sum(int(x.size) for x, t in zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if t)


@dataclasses.dataclass
class Finetuned:
  """A finetuning task's parameter tree: how to create it, its axes, what trains."""

  init: Callable[[], Params]
  axes: Params
  trainable: Params
  lora_scale: float
  description: str
  saved: Callable[[Params], Params] | None = None  # adapters merged (Task.saved_params)


def finetuned_params(config: ml_collections.ConfigDict, model: Backbone,
                     head: tuple[Callable[[jax.Array], Params], Params] | None = None,
                     reference: bool = False) -> Finetuned:
  """{"backbone", "head"} (+ "lora", + "reference"): `head` is (init(rng), logical axes)."""
  seed, cfg = config.train.seed, model.config
  scanned = getattr(cfg, "scan_layers", False)  # encoders never scan
  if scanned and (config.lora.rank > 0 or "last_block" in config.train.trainable):
    raise JaxllmError("LoRA and trainable=last_block need per-layer parameters: set "
                      "model.scan_layers=false")
  targets = lora.parse_targets(config.lora.targets) if config.lora.rank > 0 else ()

  def init():
    params = {"backbone": init_params(model, jax.random.key(seed)), "head": {}}
    head_rng, lora_rng = jax.random.split(jax.random.key(seed + 1))
    if head is not None:
      params["head"] = head[0](head_rng)
    if targets:
      params["lora"] = lora.init(lora_rng, params, targets, config.lora.rank)
    if reference:
      params["reference"] = params["backbone"]
    return param_dtype(cfg, params)  # the head and adapters too

  abstract = jax.eval_shape(init)
  axes = {"backbone": logical_axes(model), "head": head[1] if head is not None else {}}
  if targets:
    axes["lora"] = lora.logical_axes(abstract["lora"], axes)
  if reference:
    axes["reference"] = axes["backbone"]
  trainable = trainable_mask(abstract, config.train.trainable, cfg.n_layer)
  if targets and not any(jax.tree.leaves(trainable["lora"])):
    raise JaxllmError("lora.rank > 0 but train.trainable does not train the adapters "
                      "(add 'lora')")
  adapters = f", LoRA rank {config.lora.rank}" if targets else ""
  total = sum(int(x.size) for x in jax.tree.leaves(abstract))
  description = (f"{count_trainable(abstract, trainable):,} of {total:,} parameters trained "
                 f"({config.train.trainable}{adapters})")
  scale = lora.scale(config.lora.alpha, config.lora.rank) if targets else 0.0
  saved = functools.partial(merged_params, lora_scale=scale) if targets else None
  return Finetuned(init, axes, trainable, scale, description, saved)


def export_finetuned(params: Params, lora_scale: float) -> dict[str, Params]:
  """What a finetuned run saves: adapters merged; params/ the GPT (so `jaxllm generate` and
  `run_io.load_run` read it), head/ the head if there is one."""
  merged = losses.effective_params(params, lora_scale)
  out = {"params": merged["backbone"]}
  if jax.tree.leaves(merged["head"]):
    out["head"] = merged["head"]
  return out


def merged_params(params: Params, lora_scale: float) -> Params:
  """The parameters a finetuned run saves, as one tree: adapters merged into their kernels
  (the DPO reference kept), so `eval_fn` takes them as it takes the training ones."""
  return losses.effective_params(params, lora_scale)


def finetuned_report(task: str) -> Callable:
  """The final report of a task whose figures are all evaluation sums: those, and its name."""
  def report(workdir: pathlib.Path, params: Params, figures: dict) -> dict:
    del workdir, params
    return {**figures, "task": task}
  return report


def check_lm_options(config: ml_collections.ConfigDict) -> None:
  """Pretraining (lm, mlm) trains every parameter."""
  if config.lora.rank > 0 or config.train.trainable != "all":
    raise JaxllmError(f"train.task={config.train.task} trains every parameter: set "
                      f"lora.rank=0 and train.trainable=all (or finetune with "
                      f"train.task=instruct)")


# --- Batches ------------------------------------------------------------------------------


def microbatches(batch: Batch, count: int, rows: slice | None) -> Batch:
  """B x ... arrays as count x (B / count) x ..., keeping only `rows` of each microbatch."""
  split = {k: v.reshape(count, -1, *v.shape[1:]) for k, v in batch.items()}
  return split if rows is None else {k: v[:, rows] for k, v in split.items()}


def pad_rows(batch: Batch, size: int) -> Batch:
  """`size` rows: zero rows appended (every task's weights are 0 there), so a short last
  evaluation batch keeps the one compiled shape and still splits over the devices."""
  return {k: np.concatenate([v, np.zeros((size - len(v), *v.shape[1:]), v.dtype)])
          for k, v in batch.items()}


HEAD_AXES = {"kernel": P("embed", None), "bias": P(None)}
