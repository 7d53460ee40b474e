"""The GPT's two parameter layouts: one entry per block (blocks_0, blocks_1, ...), or, under
`model.scan_layers`, one "blocks" entry whose arrays have a leading layer axis; a run's
parameters are read into either."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def stack_layers(params: Any, n_layer: int) -> Any:
  """Params in the default layout (blocks_0, blocks_1, ...) as `scan_layers` holds them: one
  "blocks" entry whose arrays have a leading layer axis."""
  stacked = {k: v for k, v in params.items() if not k.startswith("blocks_")}
  stacked["blocks"] = jax.tree.map(lambda *layers: jnp.stack(layers),
                                   *[params[f"blocks_{i}"] for i in range(n_layer)])
  return stacked


def unstack_layers(params: Any) -> Any:
  """`stack_layers` undone: the stacked "blocks" entry as blocks_0, blocks_1, ..."""
  n_layer = jax.tree.leaves(params["blocks"])[0].shape[0]
  unstacked = {k: v for k, v in params.items() if k != "blocks"}
  for i in range(n_layer):
    unstacked[f"blocks_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["blocks"])
  return unstacked


def is_stacked(params: Any) -> bool:
  """Whether a GPT's params (or their stored tree) hold `scan_layers`' stacked blocks."""
  return "blocks" in params


def _layer_struct(x: jax.ShapeDtypeStruct, add: int | None) -> jax.ShapeDtypeStruct:
  """One layer's struct of a stacked leaf (add=None), or a stack of `add` of them; a
  NamedSharding keeps its spec for the other axes, the layer axis unsplit."""
  shape = x.shape[1:] if add is None else (add, *x.shape)
  sharding = x.sharding
  if isinstance(sharding, jax.sharding.NamedSharding):
    spec = tuple(sharding.spec)
    spec = spec[1:] if add is None else (None, *spec)
    sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
  return jax.ShapeDtypeStruct(shape, x.dtype, sharding=sharding)


def abstract_in_layout(target: Any, stacked: bool) -> Any:
  """ShapeDtypeStructs of a GPT's params (`target`) in the stacked or per-layer layout."""
  if is_stacked(target) == stacked:
    return target
  if stacked:
    n_layer = sum(k.startswith("blocks_") for k in target)
    out = {k: v for k, v in target.items() if not k.startswith("blocks_")}
    out["blocks"] = jax.tree.map(lambda x: _layer_struct(x, n_layer), target["blocks_0"])
    return out
  n_layer = jax.tree.leaves(target["blocks"])[0].shape[0]
  out = {k: v for k, v in target.items() if k != "blocks"}
  for i in range(n_layer):
    out[f"blocks_{i}"] = jax.tree.map(lambda x: _layer_struct(x, None), target["blocks"])
  return out


def to_layout(params: Any, target: Any) -> Any:
  """`params` in `target`'s layout (stacked or per layer) and shardings."""
  if is_stacked(params) == is_stacked(target):
    return params
  if is_stacked(target):
    convert = lambda p: stack_layers(p, sum(k.startswith("blocks_") for k in p))  # noqa: E731
  else:
    convert = unstack_layers
  shardings = [x.sharding for x in jax.tree.leaves(target)]
  if any(s is None for s in shardings):
    return jax.jit(convert)(params)
  return jax.jit(convert, out_shardings=jax.tree.unflatten(jax.tree.structure(target),
                                                           shardings))(params)
