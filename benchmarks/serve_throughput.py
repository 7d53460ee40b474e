"""`jaxllm serve` against `transformers serve` on GPT-2 small's shapes, in one run on this machine.

    source scripts/setup.sh && python benchmarks/serve_throughput.py [--requests 16]
        [--prompt-len 128] [--output-len 128] [--concurrency 1,16] [--json results.json]
        [--skip-transformers]

A random-weight GPT-2 small (124M, transformers' GPT2LMHeadModel) is converted with `jaxllm
convert` and exported back with `jaxllm convert --to hf`, so both servers hold the same
weights; the tokenizer is GPT-2's BPE, from tiktoken's cache (TIKTOKEN_CACHE_DIR: its
encoder.json and vocab.bpe are Hugging Face's vocab.json and merges.txt). Each server runs
alone, as a process of its own: `jaxllm serve --slots 16` (after its warm-up), then
`transformers serve` without and with `--continuous-batching`. `jaxllm bench-serve` measures
each at every --concurrency (--requests streamed completions of --prompt-len words, one GPT-2
token each, and --output-len new tokens, greedy, `ignore_eos`). Printed: output tokens/s,
median and P99 time per output token, median time to first token, per server and
concurrency, and the ratios the serving issue asks for: jaxllm at the highest concurrency
over jaxllm at 1, over transformers' better mode at the same concurrency, and its P99 TPOT
there over its single-stream median.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = pathlib.Path(__file__).resolve().parents[1]
VOCAB_JSON = "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6"  # gpt-2/encodings/main/encoder.json
MERGES = "6d1cbeee0f20b3d9449abfede4726ed8212e3aee"  # gpt-2/encodings/main/vocab.bpe


def _cpu_name() -> str:
  for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
    if line.startswith("model name"):
      return line.split(":", 1)[1].strip()
  return "unknown CPU"


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def make_models(work: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
  """(a jaxllm run, the Hugging Face folder exported from it) of one random GPT-2 small."""
  import torch
  import transformers

  cache = pathlib.Path(os.environ.get("TIKTOKEN_CACHE_DIR", ""))
  if not (cache / VOCAB_JSON).is_file():
    sys.exit("serve_throughput: set TIKTOKEN_CACHE_DIR to tiktoken's cache holding GPT-2's BPE "
             "files (source scripts/setup.sh does where the offline mirror is)")
  torch.manual_seed(0)
  source = work / "hf-random"
  transformers.GPT2LMHeadModel(transformers.GPT2Config()).save_pretrained(source)
  run, exported = work / "gpt2-small", work / "gpt2-small-hf"
  jaxllm = [sys.executable, "-m", "jaxllm.cli"]
  subprocess.run([*jaxllm, "convert", "--from", str(source), "--out", str(run)], check=True)
  subprocess.run([*jaxllm, "convert", "--from", str(run), "--to", "hf", "--out", str(exported)],
                 check=True)
  shutil.copy(cache / VOCAB_JSON, exported / "vocab.json")
  shutil.copy(cache / MERGES, exported / "merges.txt")
  (exported / "tokenizer_config.json").write_text(json.dumps({
      "tokenizer_class": "GPT2Tokenizer", "eos_token": "<|endoftext|>",
      "bos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}))
  return run, exported


@contextlib.contextmanager
def server(command: list[str], port: int, log: pathlib.Path, ready_timeout: float = 900):
  """A server process, once its /health answers 200; stopped on leaving."""
  with log.open("w") as out:
    process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
  deadline = time.time() + ready_timeout
  try:
    while True:
      if process.poll() is not None:
        sys.exit(f"serve_throughput: {' '.join(command[:3])} exited; its log: {log}")
      try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
          if response.status == 200:
            break
      except OSError:
        pass
      if time.time() > deadline:
        sys.exit(f"serve_throughput: {command[0]} not ready in {ready_timeout} s; log: {log}")
      time.sleep(1)
    yield
  finally:
    process.terminate()
    try:
      process.wait(timeout=30)
    except subprocess.TimeoutExpired:
      process.kill()


def bench(port: int, concurrency: int, args, out: pathlib.Path, model: str | None) -> dict:
  """One `jaxllm bench-serve` run: its JSON summary."""
  command = [sys.executable, "-m", "jaxllm.cli", "bench-serve", "--url", f"http://127.0.0.1:{port}",
             "--requests", str(args.requests), "--concurrency", str(concurrency),
             "--prompt-len", str(args.prompt_len), "--output-len", str(args.output_len),
             "--json", str(out)]
  if model:  # transformers serve: it refuses ignore_eos (random weights rarely end a text)
    command += ["--model", model, "--no-ignore-eos"]
  subprocess.run(command, check=False)
  return json.loads(out.read_text())


def measure(name: str, command: list[str], port: int, args, work: pathlib.Path,
            model: str | None = None) -> dict[int, dict]:
  print(f"\n=== {name} ===", flush=True)
  with server(command, port, work / f"{name}.log"):
    # A short request first: a model loaded on first use (transformers) is loaded before.
    bench(port, 1, argparse.Namespace(requests=1, prompt_len=8, output_len=4), work / "w.json",
          model)
    return {c: bench(port, c, args, work / f"{name}-{c}.json", model) for c in args.concurrency}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--requests", type=int, default=16)
  parser.add_argument("--prompt-len", type=int, default=128)
  parser.add_argument("--output-len", type=int, default=128)
  parser.add_argument("--concurrency", type=lambda t: [int(c) for c in t.split(",")],
                      default=[1, 16])
  parser.add_argument("--json", help="write every figure here")
  parser.add_argument("--skip-transformers", action="store_true")
  parser.add_argument("--workdir", help="keep the models, servers' logs and figures here "
                                        "(default: a temporary folder)")
  args = parser.parse_args()
  results = {"cpu": _cpu_name(), "cores": os.cpu_count(), "settings": vars(args)}
  with tempfile.TemporaryDirectory() as tmp:
    work = pathlib.Path(args.workdir or tmp)
    work.mkdir(parents=True, exist_ok=True)
    run, exported = make_models(work)
    port = _free_port()
    results["jaxllm"] = measure(
        "jaxllm", [sys.executable, "-m", "jaxllm.cli", "serve", "--workdir", str(run), "--port",
                   str(port), "--slots", str(max(args.concurrency))], port, args, work)
    if not args.skip_transformers:
      for mode in ("no-continuous-batching", "continuous-batching"):
        port = _free_port()
        results[f"transformers ({mode})"] = measure(
            f"transformers-{mode}", ["transformers", "serve", str(exported), "--port", str(port), "--device", "cpu",
                                     f"--{mode}"], port, args, work, model=str(exported))
  report(results, args)
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


def report(results: dict, args) -> None:
  print(f"\n{results['cpu']}, {results['cores']} cores; {args.requests} requests of "
        f"{args.prompt_len} + {args.output_len} tokens, GPT-2 small shapes (random weights)")
  print(f"{'server':40} {'conc.':>5} {'out tok/s':>10} {'TPOT med':>9} {'TPOT p99':>9} "
        f"{'TTFT med':>9} {'failed':>6}")
  for name, rows in results.items():
    if not isinstance(rows, dict) or name in ("settings",):
      continue
    for concurrency, s in rows.items():
      s = {k: v for k, v in s.items() if k != "requests"}
      print(f"{name:40} {concurrency:>5} {s['output_throughput']:>10.1f} "
            f"{s['median_tpot_ms'] or 0:>9.1f} {s['p99_tpot_ms'] or 0:>9.1f} "
            f"{s['median_ttft_ms'] or 0:>9.1f} {s['failed']:>6}")
  ours, low, high = results["jaxllm"], min(args.concurrency), max(args.concurrency)
  print(f"\njaxllm, concurrency {high} over {low}: "
        f"{ours[high]['output_throughput'] / ours[low]['output_throughput']:.2f}x output tokens/s")
  print(f"jaxllm P99 TPOT at {high} over its median at {low}: "
        f"{ours[high]['p99_tpot_ms'] / ours[low]['median_tpot_ms']:.2f}x")
  theirs = [rows[high]["output_throughput"] for name, rows in results.items()
            if name.startswith("transformers") and rows[high]["completed"]]
  if theirs:
    print(f"jaxllm over transformers serve's better mode at {high}: "
          f"{ours[high]['output_throughput'] / max(theirs):.2f}x output tokens/s")


if __name__ == "__main__":
  main()
