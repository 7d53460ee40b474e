"""Vectorised trials against separate runs: K learning rates trained at once (one jitted,
vmapped step) and one after another (`training.loop.run` each), on the same machine in one process.

    python benchmarks/vectorized_trials.py [--trials 8] [--steps 200] [--json FILE]

Prints both wall times (training through the final evaluation and saved parameters; data
tokenized once beforehand), their ratio, and how far each trial's logged losses are from its
separate run's. The model is gpt-micro (2 layers x 64) on The Verdict's characters, batch 4
x 32: a model that leaves a CPU idle, where vectorising pays.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jaxllm import config as config_lib  # noqa: E402
from jaxllm import tasks as tasks_lib  # noqa: E402
from jaxllm.tools import vectorized  # noqa: E402
from jaxllm.training import loop, metrics  # noqa: E402


def _config(data_dir: pathlib.Path, steps: int, work: pathlib.Path):
  config = config_lib.load_config(REPO / "experiments" / "shakespeare_char.py")
  config.model.preset = "gpt-micro"
  config.data.update(dataset="text", tokenizer="char", train_split="train", val_split="",
                     path=str(data_dir / "the-verdict.txt"), data_dir=str(work / "tfds"))
  config.train.update(steps=steps, eval_every=steps // 2, batch_size=4, eval_batches=2,
                      log_every=10, peak_flops=1e11, sample_tokens=4, warmup_steps=10)
  return config


def _losses(workdir: pathlib.Path) -> np.ndarray:
  records = metrics.read_metrics(workdir / "metrics.jsonl")
  return np.array([r["loss"] for r in records if "loss" in r])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--trials", type=int, default=8)
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--data-dir", default=os.environ.get("JAXLLM_SHARED_DATA"),
                      help="the folder holding the-verdict.txt (default $JAXLLM_SHARED_DATA)")
  parser.add_argument("--json", help="also write the figures to this file")
  args = parser.parse_args()
  if not args.data_dir:
    sys.exit("give --data-dir or set JAXLLM_SHARED_DATA")
  rates = [float(x) for x in np.geomspace(1e-4, 1.5e-3, args.trials)]
  with tempfile.TemporaryDirectory() as tmp:
    work = pathlib.Path(tmp)
    config = _config(pathlib.Path(args.data_dir), args.steps, work)
    tasks_lib.build(config_lib.from_dict(config.to_dict()))  # tokenize into the cache first

    start = time.perf_counter()
    vectorized.run(config, [{"train.learning_rate": lr} for lr in rates],
                   [work / f"v{i}" for i in range(args.trials)])
    together = time.perf_counter() - start

    start = time.perf_counter()
    for i, lr in enumerate(rates):
      alone = config_lib.from_dict(config.to_dict())
      alone.train.learning_rate = lr
      loop.run(alone, work / f"s{i}", progress=False)
    separate = time.perf_counter() - start

    diffs = [float(np.abs(_losses(work / f"v{i}") - _losses(work / f"s{i}")).max())
             for i in range(args.trials)]
  figures = {"trials": args.trials, "steps": args.steps, "vectorised_seconds": together,
             "separate_seconds": separate, "speedup": separate / together,
             "max_loss_diff_per_trial": diffs}
  print(f"{args.trials} trials x {args.steps} steps of gpt-micro: vectorised {together:.1f} s, "
        f"separate runs {separate:.1f} s ({separate / together:.2f}x); logged losses of each "
        f"trial within {max(diffs):.1e} of its separate run (per trial: "
        f"{', '.join(f'{d:.1e}' for d in diffs)})")
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
  main()
