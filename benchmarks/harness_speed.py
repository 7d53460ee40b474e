"""lm-evaluation-harness loglikelihood requests per second: jaxllm's in-process model
(jaxllm/eval/harness.py) against lm_eval's own `hf` model (HFLM, PyTorch), in one run, on
the same CPU and the same weights.

    source scripts/setup.sh && pip install accelerate   # HFLM's import
    python benchmarks/harness_speed.py [--documents 64] [--choices 4] [--batch-size 16]
        [--hf-batch-size B] [--jaxllm-batch-size B] [--passes 2] [--json results.json]

The model: GPT-2 small's shapes (12 layers, d_model 768, 12 heads, context 1024, vocab
50257), random weights built by transformers' GPT2LMHeadModel, saved with save_pretrained
(GPT-2's BPE files from $TIKTOKEN_CACHE_DIR beside them) and converted with `jaxllm convert`.
The requests: a multiple-choice task's, --documents contexts of 50 to 200 tokens (random words
of a fixed list) with --choices continuations of 1 to 5 tokens each, shuffled. Each model
scores them --passes times, one pass after another (jaxllm's first pass compiles a program
per padded length); the figure of a pass is requests / wall seconds of `loglikelihood`, and
the ratio is jaxllm's best pass over hf's best. The loglikelihoods of the two are checked to
agree (1e-3) before any figure is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import shutil
import tempfile
import time
import types

WORDS = ("the of and to in is that it was for on are with as his they be at one have this "
         "from or had by word but what some we can out other were all there when up use "
         "your how said an each she which do their time if will way about many then them "
         "would write like so these her long make thing see him two has look more day could "
         "go come did number sound no most people my over know water than call first who "
         "may down side been now find any new work part take get place made live where after "
         "back little only round man year came show every good me give our under name very "
         "through just form sentence great think say help low line differ turn cause much "
         "mean before move right boy old too same tell does set three want air well also "
         "play small end put home read hand port large spell add even land here must big "
         "high such follow act why ask men change went light kind off need house picture "
         "try us again animal point mother world near build self earth father").split()
GPT2_BPE = {"vocab.json": "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6",  # tiktoken's cache names
            "merges.txt": "6d1cbeee0f20b3d9449abfede4726ed8212e3aee"}


def cpu_name() -> str:
  for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
    if line.startswith("model name"):
      return line.split(":", 1)[1].strip()
  return "unknown"


def build_models(folder: pathlib.Path, seed: int) -> None:
  """GPT-2 small's shapes, random, saved as a Hugging Face folder and converted to a run."""
  import torch
  import transformers

  from jaxllm import cli

  torch.manual_seed(seed)
  transformers.GPT2LMHeadModel(transformers.GPT2Config()).save_pretrained(folder / "hf")
  cache = os.environ.get("TIKTOKEN_CACHE_DIR", "")
  for name, cached in GPT2_BPE.items():
    if not os.path.isfile(os.path.join(cache, cached)):
      raise SystemExit(f"GPT-2's BPE file {cached} is not in TIKTOKEN_CACHE_DIR={cache!r} "
                       f"(source scripts/setup.sh)")
    shutil.copy(os.path.join(cache, cached), folder / "hf" / name)
  eot = "<|endoftext|>"
  (folder / "hf" / "tokenizer_config.json").write_text(json.dumps(
      {"tokenizer_class": "GPT2TokenizerFast", "bos_token": eot, "eos_token": eot,
       "unk_token": eot}))
  if cli.main(["convert", "--from", str(folder / "hf"), "--out", str(folder / "run")]) != 0:
    raise SystemExit("jaxllm convert failed")


def make_requests(documents: int, choices: int, seed: int) -> list[tuple[str, str]]:
  """(context, continuation) pairs of a multiple-choice task: contexts of 50-200 words
  (about as many tokens), continuations of 1-5 words, shuffled."""
  rng = random.Random(seed)
  pairs = []
  for _ in range(documents):
    context = " ".join(rng.choice(WORDS) for _ in range(rng.randint(50, 200))) + "\nAnswer:"
    for _ in range(choices):
      pairs.append((context, " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 5)))))
  rng.shuffle(pairs)
  return pairs


def time_passes(lm, requests, passes: int) -> tuple[list[float], list]:
  """Requests per second of each pass, and the last pass's results."""
  rates, results = [], None
  for _ in range(passes):
    start = time.perf_counter()
    results = lm.loglikelihood(requests)
    rates.append(len(requests) / (time.perf_counter() - start))
  return rates, results


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--documents", type=int, default=64)
  parser.add_argument("--choices", type=int, default=4)
  parser.add_argument("--batch-size", type=int, default=16, help="both models' batch size")
  parser.add_argument("--hf-batch-size", type=int, help="hf's, if not --batch-size")
  parser.add_argument("--jaxllm-batch-size", type=int, help="jaxllm's, if not --batch-size")
  parser.add_argument("--passes", type=int, default=2)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--workdir", help="where the models go (default: a temporary folder)")
  parser.add_argument("--json", help="also write the figures to this file")
  args = parser.parse_args()
  os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
  hf_batch = args.hf_batch_size or args.batch_size
  jax_batch = args.jaxllm_batch_size or args.batch_size

  import numpy as np
  import torch
  from lm_eval.models.huggingface import HFLM

  from jaxllm.eval import harness

  folder = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="harness-speed-"))
  if not (folder / "run" / "params").exists():
    build_models(folder, args.seed)
  pairs = make_requests(args.documents, args.choices, args.seed)
  requests = [types.SimpleNamespace(args=pair) for pair in pairs]
  ours = harness.load(folder / "run", batch_size=jax_batch)
  theirs = HFLM(pretrained=str(folder / "hf"), device="cpu", dtype="float32",
                batch_size=hf_batch)
  lengths = [len(ours.tok_encode(c + x)) for c, x in pairs]
  jax_rates, jax_results = time_passes(ours, requests, args.passes)
  hf_rates, hf_results = time_passes(theirs, requests, args.passes)
  gap = float(np.max(np.abs(np.array([r[0] for r in jax_results])
                            - np.array([r[0] for r in hf_results]))))
  if gap > 1e-3:
    raise SystemExit(f"the two models disagree: a loglikelihood differs by {gap:.2e}")
  figures = {
      "date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(), "cores": os.cpu_count(),
      "torch_threads": torch.get_num_threads(), "requests": len(requests),
      "tokens_per_request": {"min": min(lengths), "mean": float(np.mean(lengths)),
                             "max": max(lengths)},
      "jaxllm_batch_size": jax_batch, "hf_batch_size": hf_batch,
      "jaxllm_requests_per_s": jax_rates, "hf_requests_per_s": hf_rates,
      "ratio": max(jax_rates) / max(hf_rates), "max_loglikelihood_difference": gap,
      "jaxllm_compiled_shapes": sorted(map(list, ours.devices.shapes))}
  print(f"CPU: {figures['cpu']} ({figures['cores']} cores, torch threads "
        f"{figures['torch_threads']})")
  print(f"{len(requests)} loglikelihood requests, {figures['tokens_per_request']['mean']:.0f} "
        f"tokens each on average ({min(lengths)}-{max(lengths)})")
  passes = ", ".join(f"{r:.2f}" for r in jax_rates)
  print(f"jaxllm (batch {jax_batch}): {passes} requests/s (pass by pass)")
  passes = ", ".join(f"{r:.2f}" for r in hf_rates)
  print(f"hf     (batch {hf_batch}): {passes} requests/s (pass by pass)")
  print(f"ratio (best pass over best pass): {figures['ratio']:.2f}x; largest loglikelihood "
        f"difference {gap:.1e}")
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
  main()
