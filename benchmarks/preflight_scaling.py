"""Memory per chip of real train steps compiled for a Cloud TPU slice (`jaxllm preflight`), as the
batch grows and as FSDP splits the weights: GPT-2 small (context 1,024) and Llama 3.2 1B.

    python benchmarks/preflight_scaling.py [--topology v5litepod-8] [--models gpt2,llama]
        [--json FILE]

Each row is one compile of the run's train step for the topology (evaluation and decode steps
left out: they are `jaxllm preflight`'s full report), with the parameter and optimizer bytes a
chip holds and the compiler's FLOPs against 6N + 12 L d T. Needs the tpu-preflight extra.
"""

from __future__ import annotations

import argparse
import json
import time

import jaxllm
from jaxllm.tools import preflight

# (name, experiment, overrides shared by its rows)
MODELS = {
    "gpt2": ("experiments/gpt2_owt.py", ["train.grad_accum=1", "model.remat=none"]),
    # Llama 3.2 1B's shapes (its Hugging Face config.json) at context 2,048, bf16 compute.
    "llama": ("experiments/gpt2_owt.py", ["model.preset=llama-3.2-1b", "model.vocab_size=128256",
                                          "model.context_length=2048", "train.grad_accum=1",
                                          "model.remat=dots"]),
}
# (batch, data, fsdp) rows: the batch grows on data parallel, then FSDP at a fixed batch.
ROWS = [(8, 8, 1), (16, 8, 1), (32, 8, 1), (16, 4, 2), (16, 2, 4), (16, 1, 8), (128, 8, 1)]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--topology", default="v5litepod-8")
  parser.add_argument("--models", default="gpt2,llama")
  parser.add_argument("--json", default="")
  args = parser.parse_args()
  where = preflight.target(args.topology)
  print(f"{where.name}: {where.description}")
  results = []
  for name in args.models.split(","):
    experiment, common = MODELS[name]
    print(f"\n{name} ({experiment} {' '.join(common)})")
    print(f"{'batch':>6} {'mesh':>10} {'params':>10} {'optimizer':>10} {'peak':>10} "
          f"{'of HBM':>7} {'compiled/6N':>12} {'seconds':>8}")
    for batch, data, fsdp in ROWS:
      config = jaxllm.load_config(experiment, [*common, f"train.batch_size={batch}",
                                               f"mesh.data={data}", f"mesh.fsdp={fsdp}"])
      start = time.perf_counter()
      report = preflight.preflight(config, where, evaluation=False)
      seconds = time.perf_counter() - start
      train = report.train
      ratio = (report.compiled_flops / report.model_flops
               if train.fits and report.compiled_flops else float("nan"))
      peak = f"{train.peak_bytes / 2**30:8.2f} G" if train.fits else "   refused"
      share = f"{train.peak_bytes / report.memory_bytes:6.0%}" if train.fits else "   >100%"
      print(f"{batch:>6} {f'{data}x{fsdp}x1':>10} {report.params_bytes / 2**30:8.3f} G "
            f"{report.opt_state_bytes / 2**30:8.3f} G {peak} {share} {ratio:12.3f} "
            f"{seconds:8.1f}  {'fits' if report.fits else 'does not fit: ' + train.error}")
      results.append({"model": name, "batch": batch, "mesh": [data, fsdp, 1],
                      "seconds": seconds, **report.to_json()})
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2, default=float)


if __name__ == "__main__":
  main()
