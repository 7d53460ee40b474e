"""`jaxllm preflight`: will a run fit a TPU slice? Compiled ahead of time, on this machine.

The run's own train step (the task's loss, the optimizer with its trainable mask, gradient
accumulation, remat, scan, the mesh and its rules: what `jaxllm train` jits), its evaluation
step and, for a GPT, the serving decode step are lowered with abstract inputs for a named
Cloud TPU topology (libtpu's compile-only devices: `pip install -e .[tpu-preflight]`) and
compiled by the TPU compiler, which reports each program's memory per chip. MaxText's
`train_compile.py` does the same; here it is one command, and sweeps can use it to drop trials
that could never run (`jaxllm sweep --preflight`).

    jaxllm preflight --config experiments/gpt2_owt.py --topology v5litepod-8
        [--slices N] [--find batch|remat] [--json FILE] [--config.KEY=VALUE ...]

Without libtpu, `--topology cpu-N` compiles the same programs for N simulated CPU devices
(`--hbm-gib` then says how much memory each may use).

What the report means. Per device, as the compiler lays it out: arguments (parameters,
optimizer state, the batch), outputs (the new state, aliased onto the donated arguments), and
temporaries (activations kept for the backward pass, gradients, the optimizer's scratch); the
peak is arguments + outputs - aliased + temporaries + code. FLOPs are the compiler's count for
one device's program; the model's count (6N + 12 L d T per token, what MFU uses) is printed
beside it. The roofline time is the compiler's own estimate of the step (its `optimal_seconds`),
and the MFU it implies an upper bound. Collectives are counted in the program text: one in a
scanned layer loop counts once.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxllm import config as config_lib
from jaxllm import tasks as tasks_lib
from jaxllm.errors import JaxllmError
from jaxllm.models.bert import Encoder
from jaxllm.models.gpt import count_params, init_cache
from jaxllm.serve import programs
from jaxllm.tasks import common
from jaxllm.tasks import lm as lm_task
from jaxllm.tools import tpu
from jaxllm.training import checkpoint as checkpoint_lib
from jaxllm.training import loop, sharding
from jaxllm.training import rundir as run_io
from jaxllm.training import step as train_lib

# What libtpu reads on a TPU VM; set here (unless set already) so that it loads quietly for
# compiling on a machine without chips.
_LIBTPU_QUIET = {"TPU_SKIP_MDS_QUERY": "1", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "TPU_ACCELERATOR_TYPE": "v5litepod-8",
                 "TPU_WORKER_ID": "0", "TPU_WORKER_HOSTNAMES": "localhost"}


@dataclasses.dataclass(frozen=True)
class Target:
  """Where the programs are compiled for: the devices and what each may hold."""

  name: str  # as given: v5litepod-8, cpu-8
  devices: tuple
  memory_bytes: int  # per device
  peak_flops: float  # per device, bf16 (0: unknown)
  slices: int = 1
  description: str = ""


def target(topology: str, slices: int = 1, memory_gib: float | None = None) -> Target:
  """A Cloud TPU type (v5litepod-8, v4-32, ...; libtpu's compile-only devices) or `cpu-N`."""
  if slices < 1:
    raise JaxllmError(f"--slices must be at least 1, got {slices}")
  memory = None if memory_gib is None else int(memory_gib * 2**30)
  if topology.startswith("cpu-") and topology[4:].isdigit():
    return _cpu_target(topology, int(topology[4:]), slices, memory)
  kind = tpu.tpu_type(topology)
  if importlib.util.find_spec("libtpu") is None and not os.environ.get("TPU_LIBRARY_PATH"):
    raise JaxllmError(f"compiling for {topology} needs libtpu: pip install -e '.[tpu-preflight]' "
                      f"(or --topology cpu-N for simulated CPU devices)")
  for name, value in _LIBTPU_QUIET.items():
    os.environ.setdefault(name, value)
  from jax.experimental import topologies

  try:
    desc = topologies.get_topology_desc(topology_name=kind.topology, platform="tpu",
                                        **({"num_slices": slices} if slices > 1 else {}))
  except Exception as e:  # libtpu's own error: an older wheel without this generation
    raise JaxllmError(f"libtpu cannot describe {topology} ({kind.topology}): "
                      f"{str(e).splitlines()[0]}") from None
  devices = tuple(desc.devices)
  per_chip = len(devices) // (kind.chips * slices)  # v4: libtpu shows each TensorCore
  return Target(topology, devices, memory or kind.hbm_bytes // per_chip,
                kind.peak_flops / per_chip, slices,
                f"{slices} x " * (slices > 1) + f"{kind.chips} {devices[0].device_kind} chips "
                f"({kind.topology}, {kind.hosts} host(s)), {kind.hbm_bytes / 2**30:.0f} GiB HBM "
                f"and {kind.peak_flops / 1e12:.0f} bf16 TFLOP/s a chip")


def _cpu_target(name: str, count: int, slices: int, memory: int | None) -> Target:
  if slices != 1:
    raise JaxllmError("--slices needs a TPU topology (simulated CPU devices are one slice)")
  try:  # before JAX starts its CPU backend; after, the devices are what they are
    jax.config.update("jax_num_cpu_devices", max(count, 1))
  except RuntimeError:
    pass
  devices = jax.devices("cpu")
  if len(devices) < count:
    raise JaxllmError(f"--topology {name} needs {count} CPU devices, this process has "
                      f"{len(devices)} (set XLA_FLAGS=--xla_force_host_platform_device_count="
                      f"{count} before JAX starts)")
  if memory is None:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // count
  return Target(name, tuple(devices[:count]), memory, 0.0, 1,
                f"{count} simulated CPU devices, {memory / 2**30:.2f} GiB each")


# --- What is compiled ---------------------------------------------------------------------


def _task(config: ml_collections.ConfigDict) -> tuple[tasks_lib.Task, dict, dict]:
  """The run's task, and the shapes and dtypes of one train batch (A x M x ...) and one
  evaluation batch (B x ...), each {name: (shape, dtype)}.

  Pretraining needs no data: its batches are context-length windows of token ids, and the
  model's vocabulary is model.vocab_size, the tokenizer's or the preset's (a character
  tokenizer's, unless model.vocab_size is set, is the corpus's: then the corpus is read). The
  other tasks are built as the run builds them (their data is read) and their first batches
  give the shapes.
  """
  train = config.train
  microbatch = train.batch_size // train.grad_accum
  # A character vocabulary comes from the corpus: then the corpus is read, as the run reads it.
  char_vocab = (config.data.tokenizer == "char" and not train.init_from
                and config.model.vocab_size is None
                and "vocab_size" not in config_lib.PRESETS.get(config.model.preset, {}))
  if train.task == "lm" and not char_vocab:
    common.check_lm_options(config)
    if config.data.tokenizer == "char" and not train.init_from:
      model = run_io.build_model(config_lib.model_config(config.model, None))
      tokenizer = None
    else:
      model, tokenizer = common.backbone(config)
    common.require_decoder(model, "lm", "mlm")
    task = common.Task(model=model, tokenizer=tokenizer,
                       **lm_task.model_functions(model, train.seed),
                       train_batch=None, eval_batches=None, token_key="inputs", export=None,
                       report=None)
    length = model.config.context_length
    tokens = ((train.grad_accum, microbatch, length), np.int32)
    evaluation = ((train.batch_size, length), np.int32)
    return task, {"inputs": tokens, "targets": tokens}, {
        "inputs": evaluation, "targets": evaluation,
        "weights": (evaluation[0], np.float32)}
  task = tasks_lib.build(config)
  first = task.train_batch(0, None)
  shapes = {k: ((v.shape[0], microbatch, *v.shape[2:]), v.dtype) for k, v in first.items()}
  evaluation = next(iter(task.eval_batches("val")), None) or first
  eval_shapes = {k: ((train.batch_size, *v.shape[1:]) if v.ndim else (), v.dtype)
                 for k, v in evaluation.items()}
  return task, shapes, eval_shapes


def _abstract(shapes: dict, sharding_of) -> dict:
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding_of(len(shape)))
          for k, (shape, dtype) in shapes.items()}


@dataclasses.dataclass
class Program:
  """One compiled program's figures, per device."""

  name: str
  fits: bool
  argument_bytes: int = 0
  output_bytes: int = 0
  alias_bytes: int = 0
  temp_bytes: int = 0
  code_bytes: int = 0
  flops: float = 0.0  # the compiler's count: a loop's body counts once
  collectives: dict = dataclasses.field(default_factory=dict)  # kind -> [count, bytes]
  compile_seconds: float = 0.0
  error: str = ""  # the compiler's out-of-memory message, when it refused

  @property
  def peak_bytes(self) -> int:
    return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
            + self.code_bytes)


_COLLECTIVE = re.compile(
    r"=\s*(?P<shape>\([^=]*?\)|\S+)\s+(?P<kind>all-gather|all-reduce|reduce-scatter|all-to-all|"
    r"collective-permute)(?P<start>-start)?\(")
_ARRAY = re.compile(r"\b(pred|s8|u8|s16|u16|f16|bf16|s32|u32|f32|s64|u64|f64|c64|c128)"
                    r"\[([0-9,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}


def collectives(hlo_text: str) -> dict[str, list[int]]:
  """{kind: [count, bytes of their results]} of the collectives in an HLO module's text. A
  combined collective (a tuple of arrays) counts once with all its arrays; an async pair once,
  by its start (whose tuple holds operands, then results, for all-gather and
  collective-permute)."""
  found: dict[str, list[int]] = {}
  hlo_text = re.sub(r"/\*index=\d+\*/", "", hlo_text)  # inside long tuples' shapes
  for match in _COLLECTIVE.finditer(hlo_text):
    arrays = _ARRAY.findall(match["shape"])
    if match["start"] and match["kind"] in ("all-gather", "collective-permute"):
      arrays = arrays[len(arrays) // 2:]
    if not arrays:
      continue
    size = sum(math.prod(int(d) for d in dims.split(",") if d) * _BYTES[dtype]
               for dtype, dims in arrays)
    entry = found.setdefault(match["kind"], [0, 0])
    entry[0] += 1
    entry[1] += size
  return found


def _compile(name: str, lowered_fn) -> Program:
  """Lowers and compiles `lowered_fn()`; an out-of-memory refusal is a program that does not
  fit, with the compiler's message."""
  start = time.perf_counter()
  # Compile-only devices cannot load an executable back: no persistent cache for these.
  cached = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    compiled = lowered_fn().compile()
  except Exception as e:  # XlaRuntimeError: RESOURCE_EXHAUSTED on TPU
    message = str(e)
    if "RESOURCE_EXHAUSTED" not in message and "Ran out of memory" not in message:
      raise
    first = next((line for line in message.splitlines() if "memory" in line.lower()),
                 message.splitlines()[0])
    return Program(name, fits=False, compile_seconds=time.perf_counter() - start,
                   error=first.strip())
  finally:
    jax.config.update("jax_enable_compilation_cache", cached)
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis() or {}
  if isinstance(cost, list):  # older JAX: one dict per program
    cost = cost[0] if cost else {}
  return Program(
      name, fits=True, argument_bytes=int(memory.argument_size_in_bytes),
      output_bytes=int(memory.output_size_in_bytes), alias_bytes=int(memory.alias_size_in_bytes),
      temp_bytes=int(memory.temp_size_in_bytes),
      code_bytes=int(memory.generated_code_size_in_bytes), flops=float(cost.get("flops", 0.0)),
      collectives=collectives(compiled.as_text()), compile_seconds=seconds)


@dataclasses.dataclass
class Report:
  """What `jaxllm preflight` prints and writes as JSON."""

  target: str
  description: str
  devices: int
  mesh: dict
  memory_bytes: int  # per device
  batch_size: int
  grad_accum: int
  length: int
  parameters: int
  params_bytes: int  # per device
  opt_state_bytes: int  # per device
  batch_bytes: int  # per device
  model_flops: float  # per device and step: 6N + 12 L d T per token, MFU's count
  # Per device and step by the compiler: its count (which takes a loop's body once) times the
  # accumulation loop's A microbatches; None with model.scan_layers (one layer counted).
  compiled_flops: float | None
  peak_flops: float  # per device
  tokens: int  # per step, all devices
  programs: list[Program]
  overrides: dict = dataclasses.field(default_factory=dict)

  @property
  def fits(self) -> bool:
    return all(p.fits and p.peak_bytes <= self.memory_bytes for p in self.programs)

  @property
  def train(self) -> Program:
    return self.programs[0]

  def to_json(self) -> dict:
    out = dataclasses.asdict(self)
    for program, entry in zip(self.programs, out["programs"]):
      entry["peak_bytes"] = program.peak_bytes
      entry["fits"] = program.fits and program.peak_bytes <= self.memory_bytes
    out["fits"] = self.fits
    out["seconds_at_peak"] = self.model_flops / self.peak_flops if self.peak_flops else None
    return out


def preflight(config: ml_collections.ConfigDict, where: Target, *, decode_slots: int = 0,
              evaluation: bool = True) -> Report:
  """Compiles `config`'s train step (and its evaluation and decode steps) for `where`."""
  train = config.train
  config_lib.check_train(train)
  task, train_shapes, eval_shapes = _task(config)
  mesh = sharding.make_mesh(config.mesh, devices=list(where.devices))
  rules = sharding.logical_rules(config.mesh.rules)
  sharding.check_batch(train.batch_size, train.grad_accum, mesh, rules)
  abstract_params = jax.eval_shape(task.init_params)
  sharding.check_divisible(abstract_params, task.param_axes, mesh, rules)
  steps = max(int(train.steps), 1)
  optimizer = train_lib.make_optimizer(train, steps, task.trainable)
  shardings = sharding.state_shardings(abstract_params, task.param_axes, optimizer, mesh, rules)
  state = checkpoint_lib.abstract_state(
      lambda: train_lib.create_train_state(task.init_params(), optimizer, seed=train.seed + 1),
      shardings)
  batch = _abstract(train_shapes, lambda ndim: sharding.batch_sharding(mesh, rules, 1, ndim))
  step = sharding.jit_train_step(loop.task_step(task, optimizer), shardings, mesh, rules)
  programs_ = [_compile("train step", lambda: step.lower(state, batch))]
  if evaluation:
    eval_batch = _abstract(eval_shapes, lambda ndim: sharding.batch_sharding(mesh, rules, 0, ndim))
    eval_step = sharding.jit_eval_step(task.eval_fn, shardings.params, mesh, rules,
                                       train.grad_accum)
    programs_.append(_compile("eval step", lambda: eval_step.lower(state.params, eval_batch)))
  model = task.model
  if decode_slots and not isinstance(model, Encoder) and train.task != "classify":
    programs_.append(_decode_program(model, task, state.params, mesh, rules, decode_slots))

  tokens = train_shapes[task.token_key][0]
  length = tokens[-1] if len(tokens) > 2 else 1
  n_params = count_params(abstract_params)
  per_token = train_lib.flops_per_token(model, n_params, task.lm_head, length=length,
                                        reference=task.reference_forward)
  return Report(
      target=where.name, description=where.description, devices=len(where.devices),
      mesh=dict(mesh.shape), memory_bytes=where.memory_bytes, batch_size=int(train.batch_size),
      grad_accum=int(train.grad_accum), length=int(length), parameters=n_params,
      params_bytes=sharding.bytes_per_device(state.params, shardings.params),
      opt_state_bytes=sharding.bytes_per_device(state.opt_state, shardings.opt_state),
      batch_bytes=sum(sharding.bytes_per_device(x, x.sharding) for x in batch.values()),
      model_flops=per_token * math.prod(tokens) / len(where.devices),
      compiled_flops=(None if getattr(model.config, "scan_layers", False)
                      else programs_[0].flops * train.grad_accum),
      peak_flops=where.peak_flops, tokens=math.prod(tokens), programs=programs_)


def _decode_program(model, task, params, mesh, rules, slots: int) -> Program:
  """One step of `jaxllm serve`'s decode loop over `slots` rows of the KV cache."""
  split = sharding.data_parallel_size(mesh, rules)
  slots = -(-slots // split) * split
  cfg = model.config
  cache = jax.eval_shape(lambda: init_cache(cfg, slots, cfg.context_length))

  def cache_sharding(leaf):
    spec = jax.sharding.PartitionSpec(*(("layers",) if leaf.ndim == 5 else ()), "batch",
                                      "sequence", "kv_heads", "kv")
    return nn.logical_to_mesh_sharding(spec, mesh, rules)

  cache = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                         sharding=cache_sharding(leaf)), cache)
  rows = sharding.batch_sharding(mesh, rules, 0, ndim=1)
  column = lambda dtype: jax.ShapeDtypeStruct((slots,), dtype, sharding=rows)  # noqa: E731
  sampling = (column(jnp.uint32), column(jnp.int32), column(jnp.float32), column(jnp.int32),
              column(jnp.float32))
  vocab = task.tokenizer.vocab_size if task.tokenizer is not None else cfg.vocab_size

  def lowered():
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return programs.decode.lower(model, params, cache, column(jnp.int32), column(jnp.int32),
                                   *sampling, vocab_size=min(vocab, cfg.vocab_size), top=0)
  return _compile(f"decode step ({slots} slots)", lowered)
