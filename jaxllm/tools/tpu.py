"""Cloud TPU slice types as Cloud TPU spells them (v5litepod-16, v4-8, v5p-32, v6e-8): chips,
hosts, libtpu's topology name (v5e:4x4), HBM and peak bf16 FLOP/s per chip.

`jaxllm launch tpu --accelerator` and `jaxllm preflight --topology` read the same words.
v4 and v5p count TensorCores in their names (two a chip: v4-8 is 4 chips), v5e and v6e count
chips. Slices of more than 8 chips (4 for v4 / v5p) have 4 chips a host.

Per-chip figures from Cloud TPU's system-architecture pages: HBM 32 GiB (v4), 16 GiB (v5e),
95 GiB (v5p), 32 GiB (v6e); peak bf16 275, 197, 459 and 918 TFLOP/s.
"""

from __future__ import annotations

import dataclasses
import math

from jaxllm.errors import JaxllmError

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Generation:
  name: str  # libtpu's: v4, v5e, v5p, v6e
  spellings: tuple[str, ...]  # Cloud TPU's prefixes of an accelerator type
  cores_in_name: bool  # v4-8 counts TensorCores (4 chips), v5litepod-8 chips
  dims: int  # 3-D torus (v4, v5p) or 2-D (v5e, v6e)
  hbm_bytes: int  # per chip
  peak_flops: float  # bf16, per chip
  single_host_chips: int  # the largest slice on one host


GENERATIONS = (
    Generation("v4", ("v4",), True, 3, 32 * GIB, 275e12, 4),
    Generation("v5p", ("v5p",), True, 3, 95 * GIB, 459e12, 4),
    Generation("v5e", ("v5litepod", "v5e"), False, 2, 16 * GIB, 197e12, 8),
    Generation("v6e", ("v6e",), False, 2, 32 * GIB, 918e12, 8),
)


@dataclasses.dataclass(frozen=True)
class TpuType:
  """One slice type: `v5litepod-16` is 16 v5e chips on 4 hosts, libtpu's `v5e:4x4`."""

  name: str  # as given
  generation: Generation
  chips: int
  shape: tuple[int, ...]  # chips along each torus axis

  @property
  def topology(self) -> str:
    return f"{self.generation.name}:{'x'.join(map(str, self.shape))}"

  @property
  def hosts(self) -> int:
    if self.chips <= self.generation.single_host_chips:
      return 1
    return self.chips // 4

  @property
  def hbm_bytes(self) -> int:
    return self.generation.hbm_bytes

  @property
  def peak_flops(self) -> float:
    return self.generation.peak_flops


def chip_shape(chips: int, dims: int) -> tuple[int, ...]:
  """The torus Cloud TPU gives a slice of `chips` chips: from 2x2x1 (3-D) or 2x2 (2-D), the
  last of the shortest axes doubled until it holds them: 2x2x2, 2x2x4, 2x4x4, 4x4x4, ...;
  2x4, 4x4, 4x8, ... A one-chip slice is 1x1."""
  if chips == 1:
    return (1,) * dims
  shape = [2, 2] + [1] * (dims - 2)
  while math.prod(shape) < chips:
    shortest = min(shape)
    axis = max(i for i, size in enumerate(shape) if size == shortest)
    shape[axis] *= 2
  if math.prod(shape) != chips:
    raise ValueError(chips)
  return tuple(shape)


def tpu_type(accelerator: str) -> TpuType:
  """`v5litepod-16`, `v5e-16`, `v4-8`, `v5p-32`, `v6e-8` -> its TpuType; one-line error else."""
  kind, _, size = accelerator.rpartition("-")
  generation = next((g for g in GENERATIONS if kind in g.spellings), None)
  known = ", ".join(f"{g.spellings[0]}-N" for g in GENERATIONS)
  if generation is None or not size.isdigit():
    raise JaxllmError(f"'{accelerator}' is not a TPU type jaxllm knows (Cloud TPU's names: "
                      f"{known}, e.g. v5litepod-16, v4-8)")
  count = int(size)
  chips = count // 2 if generation.cores_in_name else count
  try:
    shape = chip_shape(chips, generation.dims)
  except ValueError:
    unit = "TensorCores (2 a chip)" if generation.cores_in_name else "chips"
    raise JaxllmError(f"'{accelerator}': {count} {unit} is not a slice size Cloud TPU makes "
                      f"(powers of two, e.g. {kind}-{8 if generation.cores_in_name else 4}, "
                      f"{kind}-{16 if generation.cores_in_name else 8})") from None
  return TpuType(accelerator, generation, chips, shape)
