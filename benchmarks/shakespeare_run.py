"""One `jaxllm train` of experiments/shakespeare_char.py in a fresh process, for the benchmark
scripts beside this file: the run's final figures, its logged losses, its wall time and the
process's CPU times and peak RSS (wait4's rusage)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

from jaxllm.training import metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENT = REPO / "experiments" / "shakespeare_char.py"


def train_shakespeare(workdir: pathlib.Path, *overrides: str, env: dict | None = None) -> dict:
  """{"figures": eval.json, "losses": {step: loss}, "wall_s", "user_s", "sys_s",
  "peak_rss_mb"} of a run with `overrides` (`--config.KEY=VALUE`) and extra `env`.

  Every run compiles its programs afresh (`JAXLLM_COMPILATION_CACHE=0`: runs compared with
  each other must not find each other's programs) unless `env` names a cache."""
  command = [sys.executable, "-m", "jaxllm.cli", "train", "--config", str(EXPERIMENT),
             "--workdir", str(workdir), "--no-progress", *overrides]
  start = time.perf_counter()
  env = {**os.environ, "JAXLLM_COMPILATION_CACHE": "0", **(env or {})}
  child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
  _, status, usage = os.wait4(child.pid, 0)
  wall = time.perf_counter() - start
  if status:
    raise SystemExit(f"training failed (status {status}): {' '.join(command)}")
  records = metrics.read_metrics(workdir / "metrics.jsonl")
  return {"figures": json.loads((workdir / "eval.json").read_text()),
          "losses": {r["step"]: r["loss"] for r in records if "loss" in r}, "wall_s": wall,
          "user_s": usage.ru_utime, "sys_s": usage.ru_stime,
          "peak_rss_mb": usage.ru_maxrss / 1024}
