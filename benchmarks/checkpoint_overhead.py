"""What checkpointing costs: experiments/shakespeare_char.py without and with saves every 250 steps.

    source scripts/setup.sh && python benchmarks/checkpoint_overhead.py [--repeats 2]

Each run is a fresh `jaxllm train` process in a new run directory. "without" replaces
`jaxllm.training.checkpoint.save` by a no-op, so nothing is written; "with" saves asynchronously every
250 steps (checkpoint.every_steps=250, checkpoint.async=true: 8 saves in 2,000 steps). Runs
alternate, so a change in the machine's load hits both. Prints each run's wall time, the
training loop's steps/s and the time the loop spent blocked in saves, then the ratio of the
median wall times.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]

# Also reports how long the training loop was blocked in checkpoint.save (copying arrays to
# host memory before the background write): on a busy machine a steadier figure than wall time.
RUNNER = """
import sys, time
from jaxllm import cli
from jaxllm.training import checkpoint
save, blocked = checkpoint.save, []
def timed_save(*args, **kwargs):
  start = time.perf_counter()
  started = save(*args, **kwargs)
  if started:
    blocked.append(time.perf_counter() - start)
  return started
checkpoint.save = (lambda *args, **kwargs: False) if sys.argv[1] == "without" else timed_save
status = cli.main(sys.argv[2:])
print(f"blocked in save: {sum(blocked):.3f} s over {len(blocked)} saves")
sys.exit(status)
"""


def run_once(mode: str, workdir: pathlib.Path, extra: list[str]) -> tuple[float, float, float]:
  """(wall seconds, loop steps/s, seconds blocked in checkpoint.save) of one training process."""
  command = [sys.executable, "-c", RUNNER, mode, "train", "--config",
             "experiments/shakespeare_char.py", "--workdir", str(workdir), "--no-progress",
             "--config.checkpoint.every_steps=250", "--config.checkpoint.async=true",
             "--config.checkpoint.keep=0", *extra]
  start = time.perf_counter()
  # Each run compiles afresh: neither finds the other's programs in a compilation cache.
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "JAXLLM_COMPILATION_CACHE": "0"})
  wall = time.perf_counter() - start
  if result.returncode:
    sys.exit(f"{mode} run failed:\n{result.stderr[-2000:]}")
  steps_per_s = float(re.search(r"([\d.]+) steps/s", result.stdout).group(1))
  blocked = float(re.search(r"blocked in save: ([\d.]+) s", result.stdout).group(1))
  return wall, steps_per_s, blocked


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=1, help="runs of each kind")
  parser.add_argument("overrides", nargs="*", help="extra --config.KEY=VALUE for both")
  args = parser.parse_args()
  walls: dict[str, list[float]] = {"without": [], "with": []}
  print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
  with tempfile.TemporaryDirectory() as tmp:
    for repeat in range(args.repeats):
      for mode in ("without", "with"):
        workdir = pathlib.Path(tmp) / f"{mode}{repeat}"
        wall, steps_per_s, blocked = run_once(mode, workdir, args.overrides)
        walls[mode].append(wall)
        saved = len([p for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()])
        print(f"{mode:>7} checkpoints: wall {wall:6.1f} s, loop {steps_per_s:5.1f} steps/s, "
              f"{saved} on disk, {blocked:.2f} s blocked in save, load average "
              f"{os.getloadavg()[0]:.1f}")
  without, with_ = statistics.median(walls["without"]), statistics.median(walls["with"])
  print(f"wall time without {without:.1f} s, with {with_:.1f} s: ratio {with_ / without:.3f} "
        f"({(with_ / without - 1):+.1%})")


if __name__ == "__main__":
  main()
