"""jaxllm: GPT-style language models in JAX/Flax.

The public API (jaxllm/api.py): `load_config`, `train`, `load_run` (a `Run`), `generate`,
`convert`, and `JaxllmError` for problems a user can fix. They load on first use, so
`import jaxllm` (and `jaxllm --help`) stays quick.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from jaxllm import platforms
from jaxllm.errors import JaxllmError

platforms.leave_out_absent_tpu()  # before JAX starts its backends (jaxllm/platforms.py)

if TYPE_CHECKING:
  from jaxllm.api import Run, convert, generate, load_config, load_run, train

__version__ = "0.1.0"
__all__ = ["JaxllmError", "Run", "__version__", "convert", "generate", "load_config", "load_run",
           "train"]
_API = frozenset(__all__) - {"JaxllmError", "__version__"}


def __getattr__(name: str):
  if name in _API:
    return getattr(importlib.import_module("jaxllm.api"), name)
  raise AttributeError(f"module 'jaxllm' has no attribute '{name}'")


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_API))
