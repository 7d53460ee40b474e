"""glibc malloc settings for training: keep freed memory instead of returning it to the OS.

By default glibc serves large allocations (past a threshold that adapts up to 32 MB) with
their own mmap and gives them back with munmap, and trims the heap top past 128 KB; every
train step allocates and frees its large temporaries, so every step maps fresh pages, which
the kernel faults in and zeroes. On nanoGPT's CPU Shakespeare config that was a third of the
run's time in the kernel (16.8 s of system time in a 48 s, 600-step run) and 57.3 ms/step;
with mmap off and trimming at 1 GB, 1.6 s and 46.4 ms/step (54.6 untuned in the same
session), the same losses. At GPT-2 small's shapes (experiments/verdict_gpt2.py, batch 2 x
256, 4 steps) 6.47 against 6.78 s/step, for a peak RSS of 7.08 against 6.70 GB: freed memory
(up to `TRIM_BYTES`) stays with the process.

`jaxllm` commands call `tune()` at start; `JAXLLM_MALLOC_TUNING=0` turns it off. It changes
nothing on a C library other than glibc. The environment variables MALLOC_MMAP_MAX_,
MALLOC_TRIM_THRESHOLD_ and MALLOC_TOP_PAD_ do the same for any process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
TRIM_BYTES = 1 << 30
TOP_PAD_BYTES = 256 << 20


def tune() -> bool:
  """Applies the settings above; True if glibc took them."""
  if os.environ.get("JAXLLM_MALLOC_TUNING", "1") == "0":
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # not glibc
    return False
  mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
  return all(mallopt(param, value) == 1 for param, value in (
      (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_BYTES), (M_TOP_PAD, TOP_PAD_BYTES)))
