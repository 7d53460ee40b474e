"""jaxllm against PyTorch on this machine, side by side in one run: train steps (nanoGPT's CPU
model and GPT-2 small's shapes), their peak memory, greedy decoding, and nanoGPT's whole CPU
Shakespeare run.

    source scripts/setup.sh && python benchmarks/vs_pytorch.py [--rows ...] [--compile]
        [--json results.json] [--baseline old.json]

Every measurement is a fresh process of its own (its peak RSS is the kernel's high-water mark
for that process), run one after another on an otherwise idle machine. PyTorch is
benchmarks/torch_reference.py: nanoGPT's model and step with fused AdamW, in float32 eager
and bf16 autocast (`--compile` adds torch.compile); transformers' `generate` for decoding.
jaxllm is its own train step (jaxllm.training.step.train_step under jit, the state donated, as the
trainer runs it), in float32 and with `model.matmul_dtype=bfloat16`, and `jaxllm.serve.generate`.
Each row prints both figures and their ratio, jaxllm's speed over PyTorch's best
(> 1: jaxllm is faster); with --baseline, also each figure's change since that file.

Rows: train-small (4 layers, d 128, vocab 65, batch 12 x 64: ms/step, median of --small-steps
after 10 warm-up steps), train-gpt2 (12 layers, d 768, vocab 50,304, batch 4 x 256: s/step,
median of --gpt2-steps after one warm-up; peak RSS, also with `model.remat=dots` and
`model.scan_layers`, the memory options), decode (GPT-2 small, batch 1, 16-token
prompt, 128 new tokens, greedy: tokens/s, median of 3 after a warm-up), shakespeare
(experiments/shakespeare_char.py through `jaxllm train` against nanoGPT's CPU run of the same
config: wall time, process start to exit; each side's data prepared once beforehand; each
jaxllm run twice, on an empty compilation cache and then on the one it filled).
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

import numpy as np
from shakespeare_run import train_shakespeare

REPO = pathlib.Path(__file__).resolve().parents[1]
SHAPES = {
    "small": dict(vocab_size=65, context_length=64, n_layer=4, n_head=4, d_model=128,
                  bias=False, batch_size=12),
    "gpt2": dict(vocab_size=50304, context_length=256, n_layer=12, n_head=12, d_model=768,
                 bias=True, batch_size=4),
}
ROWS = ("train-small", "train-gpt2", "decode", "shakespeare")
LEAN = "jaxllm f32 remat=dots,scan"  # model.remat=dots, model.scan_layers=True


# --- the measurements, each run in a process of its own ---------------------------------

def jax_train(shape_name: str, matmul_dtype: str, steps: int, warmup: int,
              remat: str = "none", scan_layers: bool = False) -> dict:
  import functools

  import jax

  from jaxllm import malloc
  from jaxllm.config import default_config, model_config
  from jaxllm.models.gpt import GPT, init_params
  from jaxllm.training import step as train_lib
  malloc.tune()  # as every `jaxllm` command does
  shape = SHAPES[shape_name]
  c = default_config()
  for key in ("vocab_size", "context_length", "n_layer", "n_head", "d_model", "bias"):
    c.model[key] = shape[key]
  c.model.matmul_dtype, c.model.remat, c.model.scan_layers = matmul_dtype, remat, scan_layers
  c.train.learning_rate, c.train.weight_decay, c.train.beta2 = 6e-4, 0.1, 0.95
  c.train.schedule, c.train.warmup_steps = "constant", 0  # as the PyTorch side
  model = GPT(model_config(c.model))
  optimizer = train_lib.make_optimizer(c.train, total_steps=warmup + steps)
  # Created under jit, as the trainer does (an eager init leaves ~0.2 GB more behind).
  state = jax.jit(lambda rng: train_lib.create_train_state(init_params(model, rng), optimizer, 0)
                  )(jax.random.key(0))
  step = jax.jit(functools.partial(train_lib.train_step, optimizer=optimizer,
                                   loss_fn=functools.partial(train_lib.lm_loss, model=model)),
                 donate_argnums=0)
  tokens = np.random.default_rng(0).integers(
      0, shape["vocab_size"], (1, shape["batch_size"], shape["context_length"] + 1), np.int32)
  batch = {"inputs": jax.numpy.asarray(tokens[..., :-1]),
           "targets": jax.numpy.asarray(tokens[..., 1:])}
  times = []
  for i in range(warmup + steps):
    start = time.perf_counter()
    state, metrics = step(state, batch)
    loss = float(metrics["loss"])  # the loss reaches the host every step, as PyTorch's .item()
    if i >= warmup:
      times.append(time.perf_counter() - start)
  return {"seconds_per_step": float(np.median(times)), "last_loss": loss}


def torch_train(shape_name: str, bf16: bool, compile_: bool, steps: int, warmup: int) -> dict:
  import torch_reference
  return torch_reference.time_train_steps(SHAPES[shape_name], steps, warmup, bf16, compile_)


def jax_decode(prompt_tokens: int, new_tokens: int, repeats: int) -> dict:
  import jax

  from jaxllm import malloc
  from jaxllm.config import default_config, model_config
  from jaxllm.models.gpt import GPT, init_params
  from jaxllm.serve.generate import generate
  malloc.tune()
  c = default_config()
  c.model.preset = "gpt2-small"
  model = GPT(model_config(c.model, vocab_size=50257))
  params = init_params(model, jax.random.key(0))
  prompt = np.random.default_rng(0).integers(0, 50257, prompt_tokens).tolist()
  generate(model, params, [prompt], new_tokens, temperature=0.0)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = generate(model, params, [prompt], new_tokens, temperature=0.0)
    times.append(time.perf_counter() - start)
  assert len(out[0]) == new_tokens
  return {"tokens_per_s": new_tokens / float(np.median(times))}


def torch_decode(prompt_tokens: int, new_tokens: int, repeats: int) -> dict:
  import torch_reference
  return torch_reference.time_hf_generate(prompt_tokens, new_tokens, repeats)


def torch_shakespeare(text: str, workdir: str) -> dict:
  import torch_reference
  return torch_reference.shakespeare(text, workdir)


WORKERS = {f.__name__: f for f in (jax_train, torch_train, jax_decode, torch_decode,
                                   torch_shakespeare)}


# --- the parent: run each measurement in a child, collect, compare -------------------------

def measure(name: str, **kwargs) -> dict:
  """WORKERS[name](**kwargs) in a fresh process: its result, peak RSS (GB) and wall time (s)."""
  return _child([sys.executable, __file__, "--worker", json.dumps({"name": name, **kwargs})],
                f"{name}({kwargs})")


def _child(command: list[str], label: str) -> dict:
  start = time.perf_counter()
  done = subprocess.run(command, capture_output=True, text=True,
                        env={**os.environ, "PYTHONPATH": str(REPO / "benchmarks")})
  if done.returncode:
    sys.exit(f"{label} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
  result = json.loads(done.stdout.strip().splitlines()[-1])
  print(f"  {label}: {json.dumps(result)}", flush=True)
  return {**result, "process_wall_s": time.perf_counter() - start}


def _worker(spec: str) -> None:
  import resource
  kwargs = json.loads(spec)
  result = WORKERS[kwargs.pop("name")](**kwargs)
  result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30
  print(json.dumps(result))


def _train_row(shape: str, steps: int, warmup: int, compile_: bool) -> dict:
  runs = {"jaxllm float32": measure("jax_train", shape_name=shape, matmul_dtype="float32",
                                    steps=steps, warmup=warmup),
          "jaxllm bf16 matmuls": measure("jax_train", shape_name=shape,
                                         matmul_dtype="bfloat16", steps=steps, warmup=warmup),
          "torch float32": measure("torch_train", shape_name=shape, bf16=False, compile_=False,
                                   steps=steps, warmup=warmup),
          "torch bf16 autocast": measure("torch_train", shape_name=shape, bf16=True,
                                         compile_=False, steps=steps, warmup=warmup)}
  if shape == "gpt2":  # the memory options: per-layer residuals only, recomputed in backward
    runs[LEAN] = measure("jax_train", shape_name=shape, matmul_dtype="float32", steps=steps,
                         warmup=warmup, remat="dots", scan_layers=True)
  if compile_:
    for bf16, label in ((False, "torch compile float32"), (True, "torch compile bf16")):
      runs[label] = measure("torch_train", shape_name=shape, bf16=bf16, compile_=True,
                            steps=steps, warmup=warmup)
  return runs


def _fastest(runs: dict, prefix: str, key: str, higher_is_better: bool) -> tuple[str, float]:
  mine = {k: v[key] for k, v in runs.items() if k.startswith(prefix)}
  best = (max if higher_is_better else min)(mine, key=mine.get)
  return best, mine[best]


def _report(row: str, runs: dict, key: str, unit: str, scale: float, higher: bool) -> dict:
  """Prints a row: every run, then jaxllm's best against PyTorch's best as a speed ratio."""
  print(f"\n{row}")
  for label, result in runs.items():
    print(f"  {label:28s} {result[key] * scale:10.2f} {unit}   peak RSS "
          f"{result['peak_rss_gb']:.2f} GB")

  def speed(jax_value, torch_value):  # > 1: jaxllm faster
    return jax_value / torch_value if higher else torch_value / jax_value

  jax_label, jax_value = _fastest(runs, "jaxllm", key, higher)
  torch_label, torch_value = _fastest(runs, "torch", key, higher)
  figures = {"speed_ratio": speed(jax_value, torch_value), "jaxllm_best": jax_label,
             "torch_best": torch_label}
  print(f"  -> jaxllm ({jax_label}) {figures['speed_ratio']:.2f}x the speed of PyTorch's best "
        f"({torch_label})")
  t = runs.get("torch float32")
  for prefix, label in (("f32", "jaxllm float32"), ("lean", LEAN)):
    j = runs.get(label)
    if j and t:
      figures[f"{prefix}_speed_ratio"] = speed(j[key], t[key])
      figures[f"{prefix}_memory_ratio"] = j["peak_rss_gb"] / t["peak_rss_gb"]
      print(f"  -> {label} to torch float32: {figures[f'{prefix}_speed_ratio']:.2f}x the "
            f"speed; peak RSS {j['peak_rss_gb']:.2f} against {t['peak_rss_gb']:.2f} GB "
            f"({figures[f'{prefix}_memory_ratio']:.2f}x)")
  return {"runs": runs, **figures}


def _shakespeare(root: pathlib.Path) -> dict:
  text = os.environ.get("JAXLLM_SHARED_DATA", "")
  text = pathlib.Path(text) / "tinyshakespeare.txt" if text else None
  if text is None or not text.exists():
    sys.exit("the shakespeare row needs $JAXLLM_SHARED_DATA/tinyshakespeare.txt (see "
             "scripts/setup.sh)")
  # Each side's data prepared once (nanoGPT's prepare.py is a step of its own): a 1-step run.
  train_shakespeare(root / "warm", "--config.train.steps=1")
  runs = {}
  for label, extra in (("jaxllm float32", []),
                       ("jaxllm bf16 matmuls", ["--config.model.matmul_dtype=bfloat16"])):
    # A first run on an empty compilation cache (jaxllm/compile_cache.py) compiles everything;
    # the same run again loads what the first compiled.
    cache = {"JAXLLM_COMPILATION_CACHE": str(root / f"{label}-xla".replace(" ", "-"))}
    for cached in ("", " (cached)"):
      run = train_shakespeare(root / (label + cached).replace(" ", "-"), *extra, env=cache)
      runs[label + cached] = {"wall_s": run["wall_s"], "val_loss": run["figures"]["val_loss"],
                              "peak_rss_gb": run["peak_rss_mb"] / 1024}
      print(f"  {label + cached}: {json.dumps(runs[label + cached])}", flush=True)
  (root / "torch").mkdir()
  torch_run = measure("torch_shakespeare", text=str(text), workdir=str(root / "torch"))
  runs["torch float32"] = {"wall_s": torch_run["process_wall_s"],
                           "val_loss": torch_run["val_loss"],
                           "peak_rss_gb": torch_run["peak_rss_gb"]}
  print("\nshakespeare (2,000 steps, wall time from process start to exit)")
  for label, r in runs.items():
    print(f"  {label:30s} {r['wall_s']:10.1f} s   val loss {r['val_loss']:.4f}")
  ratios = {label: r["wall_s"] / runs["torch float32"]["wall_s"]
            for label, r in runs.items() if label.startswith("jaxllm")}
  print("  -> jaxllm's wall time against PyTorch's (goal <= 0.85): " + "; ".join(
      f"{label[len('jaxllm '):]} {ratio:.2f}x" for label, ratio in ratios.items()))
  ratio = ratios["jaxllm float32"]
  return {"runs": runs, "wall_time_ratio": ratio, "speed_ratio": 1 / ratio,
          "bf16_wall_time_ratio": ratios["jaxllm bf16 matmuls"],
          "cached_wall_time_ratio": ratios["jaxllm float32 (cached)"],
          "cached_bf16_wall_time_ratio": ratios["jaxllm bf16 matmuls (cached)"]}


def _compare(results: dict, baseline: dict) -> None:
  print("\nagainst the baseline (speed ratio to PyTorch, then and now)")
  for row, figures in results.items():
    if row in baseline and "speed_ratio" in baseline[row]:
      print(f"  {row:12s} {baseline[row]['speed_ratio']:.2f} -> {figures['speed_ratio']:.2f}")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  parser.add_argument("--rows", default=",".join(ROWS), help=f"some of {','.join(ROWS)}")
  parser.add_argument("--small-steps", type=int, default=100)
  parser.add_argument("--gpt2-steps", type=int, default=3)
  parser.add_argument("--compile", action="store_true", help="add torch.compile runs")
  parser.add_argument("--json", type=pathlib.Path, help="write the figures here")
  parser.add_argument("--baseline", type=pathlib.Path, help="a --json file to compare with")
  args = parser.parse_args(argv)
  if args.worker:
    _worker(args.worker)
    return 0
  rows = args.rows.split(",")
  unknown = set(rows) - set(ROWS)
  if unknown:
    parser.error(f"unknown rows {sorted(unknown)}; choose from {','.join(ROWS)}")
  import platform
  print(f"machine: {platform.machine()} {_cpu_name()}, {os.cpu_count()} cores; python "
        f"{platform.python_version()}", flush=True)
  results = {}
  if "train-small" in rows:
    runs = _train_row("small", args.small_steps, 10, args.compile)
    results["train-small"] = _report("train step, nanoGPT CPU model (B12 x T64)", runs,
                                     "seconds_per_step", "ms/step", 1000, higher=False)
  if "train-gpt2" in rows:
    runs = _train_row("gpt2", args.gpt2_steps, 1, args.compile)
    for r in runs.values():
      r["tokens_per_s"] = 4 * 256 / r["seconds_per_step"]
    results["train-gpt2"] = _report("train step, GPT-2 small shapes (B4 x T256)", runs,
                                    "tokens_per_s", "tok/s", 1, higher=True)
  if "decode" in rows:
    runs = {"jaxllm float32": measure("jax_decode", prompt_tokens=16, new_tokens=128, repeats=3),
            "torch transformers": measure("torch_decode", prompt_tokens=16, new_tokens=128,
                                          repeats=3)}
    results["decode"] = _report("greedy decode, GPT-2 small, batch 1, 16 + 128 tokens", runs,
                                "tokens_per_s", "tok/s", 1, higher=True)
  if "shakespeare" in rows:
    with tempfile.TemporaryDirectory(prefix="jaxllm-vs-torch-") as root:
      results["shakespeare"] = _shakespeare(pathlib.Path(root))
  if args.json:
    args.json.write_text(json.dumps(results, indent=1))
  if args.baseline:
    _compare(results, json.loads(args.baseline.read_text()))
  return 0


def _cpu_name() -> str:
  for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
    if line.startswith("model name"):
      return line.split(":", 1)[1].strip()
  return "unknown CPU"


if __name__ == "__main__":
  sys.exit(main())
