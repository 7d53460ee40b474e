"""The Shakespeare expectation, measured: nanoGPT's recipe (benchmarks/torch_reference.py, in
PyTorch) and experiments/shakespeare_char.py over several seeds, both evaluated the same way
(E random batches of each split, nanoGPT's eval_iters), printing each seed's validation loss
and each side's mean and sample standard deviation: the figures the experiment's EXPECTED
states.

    python benchmarks/shakespeare_seeds.py [--seeds 1337,1,2] [--eval-batches 200] [--json F]

Needs the hf extra (PyTorch) and $JAXLLM_SHARED_DATA/tinyshakespeare.txt (or --text).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import shakespeare_run  # noqa: E402
import torch_reference  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", default="1337,1,2")
  parser.add_argument("--eval-batches", type=int, default=200)
  parser.add_argument("--text", default=os.path.join(os.environ.get("JAXLLM_SHARED_DATA", ""),
                                                     "tinyshakespeare.txt"))
  parser.add_argument("--json", help="write the figures here too")
  args = parser.parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  results = {"eval_batches": args.eval_batches, "nanogpt": {}, "jaxllm": {}}
  with tempfile.TemporaryDirectory() as tmp:
    for seed in seeds:
      run = torch_reference.shakespeare(args.text, tmp, seed=seed, eval_batches=args.eval_batches)
      results["nanogpt"][seed] = run["val_loss"]
      print(f"nanoGPT seed {seed}: val {run['val_loss']:.4f} ({run['wall_s']:.0f} s)", flush=True)
      run = shakespeare_run.train_shakespeare(
          pathlib.Path(tmp) / f"jaxllm-{seed}", f"--config.train.seed={seed}",
          f"--config.train.eval_batches={args.eval_batches}")
      results["jaxllm"][seed] = run["figures"]["val_loss"]
      print(f"jaxllm  seed {seed}: val {run['figures']['val_loss']:.4f} ({run['wall_s']:.0f} s)",
            flush=True)
  for side in ("nanogpt", "jaxllm"):
    values = list(results[side].values())
    spread = statistics.stdev(values) if len(values) > 1 else float("nan")
    results[f"{side}_mean"], results[f"{side}_std"] = statistics.mean(values), spread
    print(f"{side}: mean {statistics.mean(values):.4f}, std {spread:.4f} over {len(values)} "
          f"seeds, {args.eval_batches} evaluation batches")
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
  main()
