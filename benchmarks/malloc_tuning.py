"""What jaxllm's glibc malloc tuning (jaxllm/malloc.py) does to a training run's time.

    source scripts/setup.sh && python benchmarks/malloc_tuning.py [--steps 600] [--repeats 1]

Runs experiments/shakespeare_char.py for --steps steps (no checkpoints) in fresh processes,
with JAXLLM_MALLOC_TUNING=1 and =0 alternately, and prints for each the training loop's
ms/step, the process's user and system CPU seconds and peak RSS (wait4's rusage), and the
final validation loss (which must not change).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

from shakespeare_run import train_shakespeare


def run(workdir: pathlib.Path, tuning: str, steps: int) -> dict:
  result = train_shakespeare(workdir, f"--config.train.steps={steps}",
                             f"--config.train.decay_steps={steps}",
                             "--config.checkpoint.every_steps=0",
                             env={"JAXLLM_MALLOC_TUNING": tuning})
  return {"ms_per_step": 1000 * result["figures"]["train_seconds"] / steps,
          "val_loss": result["figures"]["val_loss"], **result}


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
