"""Compiled XLA programs kept on disk between `jaxllm` runs (JAX's persistent compilation cache).

Each run compiles its parameter initialisation, train step, evaluation, fingerprint and
generation loop before the first of them runs: on nanoGPT's CPU Shakespeare config, 7.4 s of
XLA compilation per run (the initialisation alone 2.1 s). A later run of the same shapes,
settings and JAX version loads them instead: a 20-step run of that config in 7.1 against
13.2 s, the 2,000-step run in 83.7 against 93.5 s. The programs are the same machine code, so
the numbers are the same bit for bit; anything that changes a program (shapes, config, XLA
flags, jax version) makes a new entry.

`jaxllm` commands call `enable()` at start. The cache is `$JAXLLM_COMPILATION_CACHE`, by
default `$XDG_CACHE_HOME/jaxllm/xla` (`~/.cache/jaxllm/xla`), holding at most `MAX_BYTES`
(least recently used entries go first); `JAXLLM_COMPILATION_CACHE=0` turns it off. A cache
that JAX was given directly (`JAX_COMPILATION_CACHE_DIR`) is used as it is.
"""

from __future__ import annotations

import os
import pathlib

import jax

MAX_BYTES = 2 << 30
# Programs that compile faster than this are not worth a file (jnp's eager one-op programs
# take ~0.02 s; a train step, 1-15 s).
MIN_COMPILE_SECONDS = 0.1


def default_dir() -> pathlib.Path:
  cache_home = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  return pathlib.Path(cache_home) / "jaxllm" / "xla"


def enable() -> str | None:
  """Turns the cache on as described above; returns its directory (None when off)."""
  setting = os.environ.get("JAXLLM_COMPILATION_CACHE", "")
  if setting == "0":
    return None
  if jax.config.jax_compilation_cache_dir:  # set for JAX itself
    return jax.config.jax_compilation_cache_dir
  path = str(pathlib.Path(setting).expanduser() if setting else default_dir())
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
  jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)  # LRU eviction, file-locked
  return path
