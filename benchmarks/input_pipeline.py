"""What the input pipeline costs a training step: experiments/shakespeare_char.py with batches
made in the training loop (data.prefetch=0) and made ahead by a thread (data.prefetch=2).

    source scripts/setup.sh && python benchmarks/input_pipeline.py [--steps 2000] [--repeats 2]

Each run is a fresh `jaxllm train` process in a new run directory, without checkpoints; runs
alternate, so a change in the machine's load hits both. For each it prints the training
loop's milliseconds per step and `input_wait`: the share of the loop's time spent waiting for
the next batch (cut on the host and placed on the devices), which with prefetching is only
what the thread had not finished ahead. It also checks that both settings log the same
losses at every step: prefetching changes when batches are made, never which.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile

from shakespeare_run import train_shakespeare


def train(workdir: pathlib.Path, prefetch: int, steps: int) -> dict:
  result = train_shakespeare(workdir, f"--config.data.prefetch={prefetch}",
                             f"--config.train.steps={steps}",
                             f"--config.train.decay_steps={steps}",
                             "--config.checkpoint.every_steps=0")
  return {"ms_per_step": 1000 * result["figures"]["train_seconds"] / steps,
          "input_wait": result["figures"]["input_wait"], "losses": result["losses"]}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=2000)
  parser.add_argument("--repeats", type=int, default=2)
  args = parser.parse_args(argv)
  runs: dict[int, list[dict]] = {0: [], 2: []}
  with tempfile.TemporaryDirectory(prefix="jaxllm-input-") as root:
    for repeat in range(args.repeats):
      for prefetch in runs:
        result = train(pathlib.Path(root) / f"p{prefetch}-{repeat}", prefetch, args.steps)
        runs[prefetch].append(result)
        print(f"data.prefetch={prefetch}: {result['ms_per_step']:.2f} ms/step, waiting for "
              f"data {result['input_wait']:.2%} of the loop", flush=True)
  same = all(r["losses"] == runs[0][0]["losses"] for rs in runs.values() for r in rs)
  print(f"losses identical at all {len(runs[0][0]['losses'])} logged steps: {same}")
  for prefetch, results in runs.items():
    print(f"median data.prefetch={prefetch}: "
          f"{statistics.median(r['ms_per_step'] for r in results):.2f} ms/step, input wait "
          f"{statistics.median(r['input_wait'] for r in results):.2%}")
  return 0 if same else 1


if __name__ == "__main__":
  sys.exit(main())
