"""Keeps JAX from starting a TPU runtime on a machine that has no TPU.

The `tpu-preflight` extra installs libtpu so that `jaxllm preflight` can compile for a TPU
topology on a CPU host. With libtpu importable, JAX also tries to start a TPU backend at the
first device query of every process, and libtpu prints a page of warnings when no chip is
there. So where libtpu is installed, no TPU is attached (no PCI device with Google's vendor id,
JAX's own test) and JAX_PLATFORMS is unset, `import jaxllm` leaves the TPU out of JAX's
platforms (JAX_PLATFORMS=cpu, or cuda,cpu / rocm,cpu where a GPU plugin is installed).
Preflight loads libtpu itself, for compiling only. A TPU VM is untouched.
"""

from __future__ import annotations

import glob
import importlib.util
import os

_GOOGLE_PCI_VENDOR = "0x1ae0"
_GPU_PLUGINS = {"jax_cuda13_plugin": "cuda", "jax_cuda12_plugin": "cuda",
                "jax_rocm7_plugin": "rocm", "jax_rocm60_plugin": "rocm"}


def tpu_attached() -> bool:
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(vendor) as f:
        if f.read().strip() == _GOOGLE_PCI_VENDOR:
          return True
    except OSError:
      continue
  return bool(glob.glob("/dev/accel*"))


def leave_out_absent_tpu() -> None:
  if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
    return
  if tpu_attached():
    return
  gpu = next((name for module, name in _GPU_PLUGINS.items()
              if importlib.util.find_spec(module) is not None), None)
  os.environ["JAX_PLATFORMS"] = f"{gpu},cpu" if gpu else "cpu"
