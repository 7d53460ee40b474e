"""What jaxllm's glibc malloc tuning (jaxllm/malloc.py) does to a training run's time.

    source scripts/setup.sh && python benchmarks/malloc_tuning.py [--steps 600] [--repeats 1]

Runs experiments/shakespeare_char.py for --steps steps (no checkpoints) in fresh processes,
with JAXLLM_MALLOC_TUNING=1 and =0 alternately, and prints for each the training loop's
ms/step, the process's user and system CPU seconds and peak RSS (wait4's rusage), and the
final validation loss (which must not change).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def run(workdir: pathlib.Path, tuning: str, steps: int) -> dict:
  command = [sys.executable, "-m", "jaxllm.cli", "train", "--config",
             str(REPO / "experiments" / "shakespeare_char.py"), "--workdir", str(workdir),
             f"--config.train.steps={steps}", f"--config.train.decay_steps={steps}",
             "--config.checkpoint.every_steps=0", "--no-progress"]
  start = time.perf_counter()
  child = subprocess.Popen(command, env={**os.environ, "JAXLLM_MALLOC_TUNING": tuning},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  _, status, usage = os.wait4(child.pid, 0)
  if status:
    raise SystemExit(f"training failed (status {status}): {' '.join(command)}")
  figures = json.loads((workdir / "eval.json").read_text())
  return {"ms_per_step": 1000 * figures["train_seconds"] / steps, "val_loss": figures["val_loss"],
          "user_s": usage.ru_utime, "sys_s": usage.ru_stime, "wall_s": time.perf_counter() - start,
          "peak_rss_mb": usage.ru_maxrss / 1024}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--repeats", type=int, default=1)
  args = parser.parse_args(argv)
  results = {"1": [], "0": []}
  with tempfile.TemporaryDirectory(prefix="jaxllm-malloc-") as root:
    for repeat in range(args.repeats):
      for tuning in results:
        r = run(pathlib.Path(root) / f"t{tuning}-{repeat}", tuning, args.steps)
        results[tuning].append(r)
        print(f"JAXLLM_MALLOC_TUNING={tuning}: {r['ms_per_step']:.2f} ms/step, wall "
              f"{r['wall_s']:.1f} s, user {r['user_s']:.1f} s, system {r['sys_s']:.1f} s, "
              f"peak RSS {r['peak_rss_mb']:.0f} MB, val loss {r['val_loss']:.4f}", flush=True)
  same = len({r["val_loss"] for rs in results.values() for r in rs}) == 1
  print(f"validation loss identical: {same}")
  return 0 if same else 1


if __name__ == "__main__":
  sys.exit(main())
