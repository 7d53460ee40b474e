"""The device mesh (axes data, fsdp, tensor), the logical-axis rules, and the shardings they give.

The model names logical axes ("batch", "embed", "heads", ...) and never mentions devices; a
table of rules maps each logical axis to mesh axes (MaxText's `logical_axis_rules`). Data,
FSDP and tensor parallelism are then configurations of the one train step:

- data parallel (mesh.data): batch rows split, everything else replicated;
- FSDP (mesh.fsdp): batch rows split too, and every weight's d_model side ("embed") split, so
  parameters and optimizer state take 1/fsdp of the memory; the compiler gathers each
  layer's weights where they are used;
- tensor parallel (mesh.tensor): attention heads, MLP hidden units and the vocabulary split
  (Megatron), activations between blocks whole.

One device is the mesh (1, 1, 1); the same code runs on a pod slice.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxllm.errors import JaxllmError
from jaxllm.models.gpt import GPT, abstract_variables, logical_axes
from jaxllm.training import step as train_lib

MESH_AXES = ("data", "fsdp", "tensor")
# Batch rows are split over every axis that holds a different slice of the data.
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axis (or axes, or None: replicated). An array's dimensions take their
# rules in this order and a mesh axis serves one dimension only, so order matters: an
# activation's "batch" takes (data, fsdp) first and its "embed", which weights split over
# fsdp, stays whole. `mesh.rules` in the config replaces the rules of the axes it names.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("sequence", None),
    ("vocab", "tensor"),  # embedding rows and logits (Megatron's vocab-parallel head)
    ("embed", "fsdp"),  # the d_model side of every weight: FSDP
    ("heads", "tensor"),  # attention heads (Megatron)
    ("kv_heads", "tensor"),  # key/value heads of grouped-query attention
    ("kv", None),  # head dim
    ("mlp", "tensor"),  # MLP hidden units (Megatron)
    ("layers", None),  # the stacked axis of model.scan_layers
)
Rules = Sequence[tuple[str, Any]]

# What a logical axis's size is called in the config, for errors a user can act on.
_AXIS_SIZES = {"vocab": "model.vocab_size", "heads": "model.n_head", "embed": "model.d_model",
               "mlp": "model.mlp_hidden (4 * d_model by default)", "layers": "model.n_layer",
               "kv_heads": "model.n_kv_head"}


def make_mesh(mesh_config: ml_collections.ConfigDict, devices=None) -> Mesh:
  """A Mesh of shape (data, fsdp, tensor); one size may be -1 for "all remaining devices"."""
  devices = jax.devices() if devices is None else devices
  sizes = [int(mesh_config[axis]) for axis in MESH_AXES]
  if sizes.count(-1) > 1:
    raise JaxllmError(f"mesh {tuple(sizes)}: at most one axis may be -1")
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    if len(devices) % known:
      raise JaxllmError(f"mesh {tuple(sizes)} does not fit {len(devices)} devices "
                        f"({len(devices)} is not divisible by {known})")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise JaxllmError(f"mesh (data, fsdp, tensor) = {tuple(sizes)} needs {math.prod(sizes)} "
                      f"devices, but {len(devices)} are available (set mesh.data/fsdp/tensor)")
  slices = len({getattr(d, "slice_index", 0) for d in devices})
  if slices > 1:  # multislice: the data axis spans the slices (DCN), the rest stays in one
    if sizes[0] % slices:
      raise JaxllmError(f"mesh.data={sizes[0]} must be a multiple of the {slices} slices (the "
                        f"data axis spans them; fsdp and tensor stay inside one slice)")
    grid = mesh_utils.create_hybrid_device_mesh(
        (sizes[0] // slices, *sizes[1:]), (slices, 1, 1), devices)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                       devices=devices)


def logical_rules(overrides: Rules = ()) -> tuple[tuple[str, Any], ...]:
  """DEFAULT_RULES with the logical axes named in `overrides` mapped as those say.

  An overridden axis keeps its place in the table; a new one goes at the end. Lists (from
  config.json) become tuples.
  """
  overrides = [(str(name), _mesh_axes(name, axes)) for name, axes in overrides]
  rules = []
  for name, axes in DEFAULT_RULES:
    rules.extend([rule for rule in overrides if rule[0] == name] or [(name, axes)])
  defaults = {name for name, _ in DEFAULT_RULES}
  rules.extend(rule for rule in overrides if rule[0] not in defaults)
  return tuple(rules)


def _mesh_axes(name: str, axes: Any) -> str | tuple[str, ...] | None:
  if axes is None or axes == []:
    return None
  axes_tuple = (axes,) if isinstance(axes, str) else tuple(axes)
  for axis in axes_tuple:
    if axis not in MESH_AXES:
      raise JaxllmError(f"mesh.rules maps '{name}' to unknown mesh axis '{axis}' (mesh axes: "
                        f"{', '.join(MESH_AXES)}, or None)")
  return axes_tuple[0] if len(axes_tuple) == 1 else axes_tuple


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def logical_sharding(mesh: Mesh, rules: Rules, *axes: str | None) -> NamedSharding:
  """The sharding of an array whose dimensions have these logical names."""
  return NamedSharding(mesh, nn.logical_to_mesh_axes(axes, rules))


def batch_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES, leading_axes: int = 0,
                   ndim: int | None = None) -> NamedSharding:
  """Batch arrays (rows x sequence x ...), after `leading_axes` unsplit axes (microbatches).

  `ndim` (default leading_axes + 2) counts all dimensions: rows come first, then positions,
  then anything else (pairs, classes) unsplit.
  """
  ndim = leading_axes + 2 if ndim is None else ndim
  axes = [None] * leading_axes + ["batch", "sequence"][:ndim - leading_axes]
  return logical_sharding(mesh, rules, *axes, *[None] * (ndim - len(axes)))


def _axes(axes: str | tuple[str, ...] | None) -> tuple[str, ...]:
  """A PartitionSpec entry as a tuple of mesh axis names."""
  return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def data_parallel_size(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> int:
  """How many ways batch rows are split (the mesh axes of the "batch" rule)."""
  return math.prod(mesh.shape[axis] for axis in _axes(batch_sharding(mesh, rules).spec[0]))


def check_batch(batch_size: int, grad_accum: int, mesh: Mesh, rules: Rules) -> None:
  """A microbatch must split evenly over the devices that hold different rows."""
  split = data_parallel_size(mesh, rules)
  microbatch = batch_size // grad_accum
  if microbatch % split:
    axes = _axes(batch_sharding(mesh, rules).spec[0])
    raise JaxllmError(
        f"batch of {microbatch} sequences (train.batch_size={batch_size} / train.grad_accum="
        f"{grad_accum}) is not divisible by the {split} batch shards (mesh "
        f"{' x '.join(f'{axis}={mesh.shape[axis]}' for axis in axes)}); use a multiple of {split}")


def model_axes(model: GPT) -> tuple[Any, Any]:
  """A GPT's abstract parameters (ShapeDtypeStructs) and their logical axes (PartitionSpecs)."""
  return nn.unbox(abstract_variables(model)["params"]), logical_axes(model)


def param_shardings(param_axes: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings like the params, from each parameter's logical axes and the rules."""
  return nn.logical_to_mesh_sharding(param_axes, mesh, rules)


def _spec_leaves(tree: Any) -> list[P]:
  return jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, P))


def check_divisible(abstract_params: Any, param_axes: Any, mesh: Mesh, rules: Rules) -> None:
  """Every split parameter dimension must divide evenly over its mesh axes."""
  shapes = jax.tree_util.tree_leaves_with_path(abstract_params)
  shardings = jax.tree.leaves(param_shardings(param_axes, mesh, rules))
  for (path, shape), spec, sharding in zip(shapes, _spec_leaves(param_axes), shardings):
    for size, name, axes in zip(shape.shape, spec, sharding.spec):
      axes = _axes(axes)
      split = math.prod(mesh.shape[axis] for axis in axes)
      if size % split:
        what = _AXIS_SIZES.get(name, f"dimension '{name}' of {jax.tree_util.keystr(path)}")
        fix = {"vocab": f"set model.vocab_size={-(-size // split) * split} (ids past the "
                        f"tokenizer's are never used), or map 'vocab' to None in mesh.rules",
               "kv_heads": "replicate the kv heads (each device keeps all of them) with "
                           "--config.mesh.rules=\"[('kv_heads', None)]\""}.get(
                   name, f"change the model size or the mesh, or map '{name}' to None in "
                         f"mesh.rules")
        raise JaxllmError(
            f"{what}={size} is not divisible by mesh {' x '.join(axes)}={split} ('{name}' is "
            f"split over {' x '.join(axes)}); {fix}")


def state_shardings(abstract_params: Any, param_axes: Any,
                    optimizer: optax.GradientTransformation, mesh: Mesh,
                    rules: Rules) -> train_lib.TrainState:
  """A TrainState of NamedShardings: params by the rules, optimizer state like its params.

  An optimizer-state leaf whose trailing dict keys name a parameter of the same shape (Adam's
  mu and nu) is split like that parameter; everything else (step, counts, rng) is replicated.
  """
  params = param_shardings(param_axes, mesh, rules)
  by_path = {_dict_keys(path): (sharding, shape.shape) for (path, sharding), shape in zip(
      jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(abstract_params))}

  def place(path, leaf):
    sharding, shape = by_path.get(_dict_keys(path), (None, None))
    return sharding if shape == leaf.shape else replicated(mesh)

  opt_state = jax.eval_shape(optimizer.init, abstract_params)
  return train_lib.TrainState(
      step=replicated(mesh), params=params,
      opt_state=jax.tree_util.tree_map_with_path(place, opt_state), rng=replicated(mesh))


def _dict_keys(path) -> tuple[str, ...]:
  """The trailing run of dict keys of a pytree path: a parameter's name inside any state."""
  keys = []
  for entry in reversed(path):
    if not isinstance(entry, jax.tree_util.DictKey):
      break
    keys.append(str(entry.key))
  return tuple(reversed(keys))


def _traced_with_rules(fn, mesh: Mesh, rules: Rules):
  # The model's activation constraints read the rules and the mesh while jit traces.
  @functools.wraps(fn)
  def wrapped(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
      return fn(*args)
  return wrapped


def jit_train_step(step_fn, shardings: train_lib.TrainState, mesh: Mesh, rules: Rules):
  """`step_fn(state, batch) -> (state, metrics)` compiled for the mesh; the state is donated.

  Batches arrive as global arrays already placed (`batch_sharding`), so their shardings,
  whatever the task's batch holds, are taken from them.
  """
  return jax.jit(_traced_with_rules(step_fn, mesh, rules), in_shardings=(shardings, None),
                 out_shardings=(shardings, replicated(mesh)), donate_argnums=0)


def jit_eval_step(eval_fn, params_shardings: Any, mesh: Mesh, rules: Rules,
                  microbatches: int = 1):
  """`eval_fn(params, batch) -> sums` compiled for the mesh.

  `microbatches` > 1 (train.grad_accum) sums the batch's rows in that many slices, one after
  another, so an evaluation batch needs no more memory than a training microbatch (a slice
  holds every `microbatches`-th row: each device keeps its own rows).
  """
  if microbatches > 1:
    eval_fn = _in_microbatches(eval_fn, microbatches)
  return jax.jit(_traced_with_rules(eval_fn, mesh, rules), in_shardings=(params_shardings, None),
                 out_shardings=replicated(mesh))


def _in_microbatches(eval_fn, microbatches: int):
  def summed(params, batch):
    sliced = jax.tree.map(lambda x: jnp.moveaxis(
        x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:]), 1, 0), batch)
    sums = jax.lax.map(lambda rows: eval_fn(params, rows), sliced)
    return jax.tree.map(lambda x: x.sum(0), sums)
  return summed


def bytes_per_device(tree: Any, shardings: Any) -> int:
  """The bytes of `tree` (arrays or ShapeDtypeStructs) that one device holds."""
  return sum(math.prod(sharding.shard_shape(x.shape)) * x.dtype.itemsize
             for x, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))
