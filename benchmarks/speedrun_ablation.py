"""The ablation table of experiments/shakespeare_speedrun.py: each ingredient taken out in turn.

    source scripts/setup.sh
    python benchmarks/speedrun_ablation.py [--seeds 1337,1338,1339] [--arms full,adamw,...]
        [--runs runs/ablation] [--markdown table.md]

Every arm is `jaxllm reproduce experiments/shakespeare_speedrun.py --seeds ...` with the
overrides that take one ingredient out (ARMS below), into RUNS/<arm>/seed-S; a finished seed
is read back, not trained again, so an interrupted table resumes. Printed (and written with
--markdown): per arm, the seeds' mean and standard deviation of the steps, tokens and
seconds to the target (the nanoGPT recipe's 2,000-step validation loss) and of the final
validation loss, and how many seeds reached the target. An arm that never reaches it within
2,000 steps has no steps-to-target figure; its final loss still says what the ingredient buys.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENT = REPO / "experiments" / "shakespeare_speedrun.py"

# Arm -> the overrides that take its ingredient out of the full recipe.
ARMS = {
    "full": [],
    "adamw": ["train.optimizer=adamw"],
    "cosine": ["train.schedule=cosine"],
    "gelu": ["model.mlp=gelu"],
    "no_qk_norm": ["model.qk_norm=false"],
    "tied_head": ["model.tie_embeddings=true"],
    "no_zero_init": ["model.zero_init_proj=false"],
    "no_softcap": ["model.logit_softcap=0.0"],
    "no_x0": ["model.x0_shortcut=false"],
    "no_value_residual": ["model.value_residual=false"],
    "gpt2_blocks": ["model.norm=layernorm", "model.position=learned"],
}


def _stats(values: list[float]) -> str:
  if not values:
    return "not reached"
  if len(values) == 1:
    return f"{values[0]:.4g}"
  return f"{statistics.fmean(values):.4g} ± {statistics.stdev(values):.2g}"


def table(runs: pathlib.Path, arms: list[str], seeds: list[int]) -> str:
  lines = ["| arm | takes out | reached | steps to target | tokens to target | seconds to "
           "target | final val loss |", "|---|---|---:|---:|---:|---:|---:|"]
  for arm in arms:
    figures = [json.loads((runs / arm / f"seed-{s}" / "eval.json").read_text()) for s in seeds
               if (runs / arm / f"seed-{s}" / "eval.json").is_file()]
    reached = [f for f in figures if f.get("steps_to_target") is not None]
    cells = [_stats([f[k] for f in reached]) for k in
             ("steps_to_target", "tokens_to_target", "seconds_to_target")]
    lines.append(f"| {arm} | {' '.join(ARMS[arm]) or '(nothing)'} | {len(reached)} of "
                 f"{len(figures)} | {' | '.join(cells)} | "
                 f"{_stats([f['val_loss'] for f in figures])} |")
  return "\n".join(lines) + "\n"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seeds", default="1337,1338,1339")
  parser.add_argument("--arms", default=",".join(ARMS))
  parser.add_argument("--runs", default="runs/ablation")
  parser.add_argument("--markdown", help="also write the table here")
  args = parser.parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  arms = args.arms.split(",")
  unknown = [a for a in arms if a not in ARMS]
  if unknown:
    sys.exit(f"unknown arm(s) {', '.join(unknown)}; the arms: {', '.join(ARMS)}")

  from jaxllm.tools import reproduce

  runs = pathlib.Path(args.runs)
  for arm in arms:
    print(f"== {arm}: {' '.join(ARMS[arm]) or 'the full recipe'}", flush=True)
    reproduce.reproduce_seeds(EXPERIMENT, seeds, runs / arm, ARMS[arm], progress=False)
  text = table(runs, arms, seeds)
  print(text)
  if args.markdown:
    pathlib.Path(args.markdown).write_text(text)


if __name__ == "__main__":
  main()
