"""Several processes, one program: multi-host start-up and each process's share of the data.

A multi-host run starts the same `jaxllm train` on every host (one process per host, or per
GPU). `initialize` joins them; then every process builds the same mesh over all devices,
reads only the rows of each global batch that its own devices hold (`process_rows`), and
assembles the global arrays from those rows (`global_array`). Process 0 alone prints and
writes files; everything that runs on devices runs on all processes alike.

When `initialize` calls `jax.distributed.initialize` (nothing else here reads these):

- `JAXLLM_COORDINATOR=host:port` with `JAXLLM_NUM_PROCESSES` and `JAXLLM_PROCESS_ID`: join
  explicitly (GPU clusters without SLURM, several processes on one machine);
- `JAXLLM_DISTRIBUTED=auto`: let JAX detect the cluster (Cloud TPU, SLURM, Open MPI, ...);
- neither, but a SLURM step of several tasks (srun's; not the shell of an sbatch script or of
  salloc) or a multi-host TPU environment (`TPU_WORKER_HOSTNAMES` listing several hosts, or
  `MEGASCALE_COORDINATOR_ADDRESS`) is found: as `auto`;
- `JAXLLM_DISTRIBUTED=off`, or nothing found: one process, no call.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxllm.errors import JaxllmError

_EXPLICIT = ("JAXLLM_COORDINATOR", "JAXLLM_NUM_PROCESSES", "JAXLLM_PROCESS_ID")


# What JAX's SLURM detection reads (jax/_src/clusters/slurm_cluster.py). srun sets
# SLURM_STEP_NODELIST (with SLURM_STEP_ID) for the tasks of a step; an sbatch script's shell
# and an salloc shell have the allocation's SLURM_NTASKS but no step, and a
# jax.distributed.initialize() there would wait for peers that never start.
_SLURM_STEP = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
               "SLURM_LOCALID")


def cluster_detected(environment: Mapping[str, str]) -> bool:
  """Whether `environment` is one process of several: a SLURM step of several tasks, or a
  multi-host TPU slice."""
  slurm_step = all(name in environment for name in _SLURM_STEP)
  return ((slurm_step and int(environment["SLURM_NTASKS"]) > 1)
          or "," in environment.get("TPU_WORKER_HOSTNAMES", "")
          or "MEGASCALE_COORDINATOR_ADDRESS" in environment)


def initialize() -> None:
  """Joins a multi-process run when one is asked for or detected; once; else does nothing.

  Must run before anything touches a device (the first `jax.devices()`).
  """
  mode = os.environ.get("JAXLLM_DISTRIBUTED", "").lower()
  if mode not in ("", "auto", "off"):
    raise JaxllmError(f"JAXLLM_DISTRIBUTED must be auto or off, got '{mode}'")
  if mode == "off" or jax.distributed.is_initialized():
    return
  if "JAXLLM_COORDINATOR" in os.environ:
    missing = [name for name in _EXPLICIT if not os.environ.get(name)]
    if missing:
      raise JaxllmError(f"JAXLLM_COORDINATOR is set but {', '.join(missing)} is not (a "
                        f"multi-process run needs all of {', '.join(_EXPLICIT)})")
    # CPU devices of different processes talk over gloo; GPUs and TPUs ignore this option.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # Explicit means explicit: no cluster detection (under SLURM it would also narrow each
    # process to one GPU); JAX_LOCAL_DEVICE_IDS still picks a process's devices.
    jax.distributed.initialize(os.environ["JAXLLM_COORDINATOR"],
                               num_processes=int(os.environ["JAXLLM_NUM_PROCESSES"]),
                               process_id=int(os.environ["JAXLLM_PROCESS_ID"]),
                               cluster_detection_method="deactivate")
  elif mode == "auto" or cluster_detected(os.environ):
    jax.distributed.initialize()


def is_main() -> bool:
  """Process 0: the one that prints and writes files."""
  return jax.process_index() == 0


def process_rows(sharding: jax.sharding.Sharding, global_shape: tuple[int, ...],
                 axis: int) -> slice:
  """The rows (along `axis`) of a global array that this process's devices hold."""
  spans = {(index[axis].start or 0, global_shape[axis] if index[axis].stop is None
            else index[axis].stop)
           for index in sharding.addressable_devices_indices_map(global_shape).values()}
  start, stop = min(s for s, _ in spans), max(e for _, e in spans)
  if sum(e - s for s, e in spans) != stop - start:
    # make_mesh orders devices process by process, so this is only a mesh built by hand.
    raise JaxllmError(f"this process's devices hold rows {sorted(spans)} of the batch, not "
                      f"one contiguous block; build the mesh with sharding.make_mesh")
  return slice(start, stop)


def global_array(local: np.ndarray, sharding: jax.sharding.Sharding,
                 global_shape: tuple[int, ...]) -> jax.Array:
  """A global array from this process's rows of it (all of it, with one process)."""
  return jax.make_array_from_process_local_data(sharding, local, global_shape)


def host_copy(tree: Any) -> Any:
  """Whole numpy copies of (possibly sharded, multi-process) arrays, on every process."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


_MESSAGE_BYTES = 4096


def _broadcast_text(text: str) -> str:
  """Process 0's `text` on every process (a collective: every process must call it)."""
  data = np.zeros(_MESSAGE_BYTES, np.uint8)
  encoded = text.encode()[:_MESSAGE_BYTES]
  data[:len(encoded)] = np.frombuffer(encoded, np.uint8)
  received = np.asarray(multihost_utils.broadcast_one_to_all(data))
  return bytes(received).rstrip(b"\0").decode(errors="replace")


def main_first(fn: Callable[[], Any]) -> Any:
  """`fn()` on process 0, then, once it has succeeded, on the others (process 0 prepares what
  they then read, such as the token cache). When it fails on process 0, every other process
  raises a JaxllmError with its message at once, instead of waiting at a barrier until the
  coordination service gives up."""
  if jax.process_count() == 1:
    return fn()
  result, error, failure = None, "", None
  if is_main():
    try:
      result = fn()
    except Exception as e:  # noqa: BLE001 (re-raised below, after the others are told)
      failure = e
      error = str(e) if isinstance(e, JaxllmError) else f"{type(e).__name__}: {e}"
      error = error or type(e).__name__
  error = _broadcast_text(error)
  if failure is not None:
    raise failure
  if error:
    raise JaxllmError(f"process 0 failed, so this process stops too: {error}")
  return result if is_main() else fn()


def everywhere(flag: bool) -> bool:
  """Whether `flag` holds on every process (a collective: every process must call it)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.all(multihost_utils.process_allgather(np.int32(flag))))


def sync(name: str) -> None:
  """Waits until every process gets here (nothing to wait for with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
