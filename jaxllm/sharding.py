"""The device mesh (axes data, fsdp, tensor) and the shardings derived from it.

One device is the mesh (1, 1, 1); the same code runs on a pod slice.
"""

from __future__ import annotations

import math

import jax
import ml_collections
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxllm.errors import JaxllmError

MESH_AXES = ("data", "fsdp", "tensor")
# Batch rows are split over every axis that holds a different slice of the data.
BATCH_AXES = ("data", "fsdp")


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
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                       devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, leading_axes: int = 0) -> NamedSharding:
  """Rows of a batch split over the data axes; `leading_axes` unsplit axes before them."""
  return NamedSharding(mesh, P(*([None] * leading_axes), BATCH_AXES))


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[axis] for axis in BATCH_AXES)
