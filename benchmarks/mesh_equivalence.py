"""One experiment on several meshes of simulated CPU devices: are the logged losses the same?

    python benchmarks/mesh_equivalence.py finetune experiments/spam_classifier_cpu.py \
        --meshes 1,1,1 8,1,1 1,8,1 2,2,2 [--float64] [--workdir DIR] [--json FILE] \
        -- --config.data.path=$JAXLLM_SHARED_DATA/SMSSpamCollection

Each mesh (data,fsdp,tensor) runs `jaxllm <command> --config <experiment>` in a process of its
own with that many simulated devices (XLA_FLAGS=--xla_force_host_platform_device_count=N),
one after another; arguments after `--` go to every run. Prints, against the first mesh, the
largest |difference| of the logged train losses (and the step where it is reached), of the
evaluation figures, and each run's final figures from eval.json.

With --float64 the runs compute in float64 (model.dtype=float64, JAX_ENABLE_X64=1). In
float32 the meshes add the same numbers in different orders (a sum split over devices, a
matmul tiled another way), and a long run can grow those last-bit differences: float64
shows whether anything but rounding differs.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

from jaxllm.training import metrics

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_on(mesh: tuple[int, int, int], args, workdir: pathlib.Path) -> tuple[list, dict, float]:
  """(metrics.jsonl records, eval.json, seconds) of the experiment on `mesh`."""
  devices = mesh[0] * mesh[1] * mesh[2]
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  extra = list(args.extra)
  if args.float64:
    env["JAX_ENABLE_X64"] = "1"
    extra.append("--config.model.dtype=float64")
  command = [sys.executable, "-m", "jaxllm.cli", args.command, "--config", args.experiment,
             "--workdir", str(workdir), "--no-progress", "--config.checkpoint.resume=false",
             f"--config.mesh.data={mesh[0]}", f"--config.mesh.fsdp={mesh[1]}",
             f"--config.mesh.tensor={mesh[2]}", *extra]
  start = time.perf_counter()
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
  seconds = time.perf_counter() - start
  if result.returncode:
    sys.exit(f"mesh {mesh}: exit {result.returncode}\n{result.stderr[-3000:]}")
  records = metrics.read_metrics(workdir / "metrics.jsonl")
  figures = json.loads((workdir / "eval.json").read_text())
  return records, figures, seconds


def _series(records: list, key: str) -> dict[int, float]:
  return {r["step"]: r[key] for r in records if key in r}


def compare(reference: list, records: list) -> dict[str, tuple[float, int, int]]:
  """{figure: (max |diff|, at step, steps compared)} for every logged loss-like figure."""
  keys = sorted({k for r in reference for k in r
                 if k == "loss" or k.endswith("_loss") or k.endswith("_accuracy")})
  out = {}
  for key in keys:
    ours, theirs = _series(reference, key), _series(records, key)
    if set(ours) != set(theirs):
      sys.exit(f"{key}: logged at different steps ({len(ours)} against {len(theirs)})")
    worst = max(ours, key=lambda s: abs(ours[s] - theirs[s]))
    out[key] = (abs(ours[worst] - theirs[worst]), worst, len(ours))
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("command", choices=("train", "finetune"))
  parser.add_argument("experiment")
  parser.add_argument("--meshes", nargs="+", default=["1,1,1", "8,1,1", "1,8,1", "2,2,2"])
  parser.add_argument("--float64", action="store_true")
  parser.add_argument("--workdir", default="/tmp/jaxllm_meshes")
  parser.add_argument("--json", help="write every figure to this file")
  argv = list(sys.argv[1:] if argv is None else argv)
  split = argv.index("--") if "--" in argv else len(argv)
  args = parser.parse_args(argv[:split])
  args.extra = argv[split + 1:]  # after --: arguments for every run
  meshes = [tuple(int(n) for n in m.split(",")) for m in args.meshes]
  runs = {}
  for mesh in meshes:
    name = "x".join(map(str, mesh))
    runs[mesh] = run_on(mesh, args, pathlib.Path(args.workdir) / name)
    print(f"mesh {name}: {runs[mesh][2]:.0f} s", flush=True)
  reference, reference_figures, _ = runs[meshes[0]]
  report = {}
  dtype = "float64" if args.float64 else "float32"
  print(f"\n{dtype}, against mesh {meshes[0]} (max |diff| over the logged steps):")
  for mesh in meshes[1:]:
    records, figures, seconds = runs[mesh]
    diffs = compare(reference, records)
    report["x".join(map(str, mesh))] = {"diffs": diffs, "figures": figures, "seconds": seconds}
    text = ", ".join(f"{k} {d:.2e} (step {s}, {n} steps)" for k, (d, s, n) in diffs.items())
    print(f"  {mesh}: {text}")
  finals = {k: v for k, v in reference_figures.items() if isinstance(v, (int, float))}
  print(f"\nfinal figures (eval.json) of {meshes[0]}: {finals}")
  for mesh in meshes[1:]:
    figures = runs[mesh][1]
    same = [k for k in finals if figures.get(k) == finals[k]]
    changed = {k: figures.get(k) for k in finals if figures.get(k) != finals[k]}
    print(f"  {mesh}: equal {len(same)} of {len(finals)}" + (f"; differ: {changed}"
                                                             if changed else ""))
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(report, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
