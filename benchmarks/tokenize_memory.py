"""Peak memory and speed of preparing a corpus's token cache, for corpora of different sizes.

    source scripts/setup.sh && python benchmarks/tokenize_memory.py [--sizes-mb 100 2000]
        [--workers 0 1] [--tokenizer gpt2] [--keep DIR]

For each size it writes a text corpus of that many MB (Tiny Shakespeare copies, each with a
numbered header line so no two are alike; one file, i.e. one document, the hardest case for
memory), then for each worker count prepares its token cache in a fresh process
(`jaxllm.data.load_token_data`, data.dataset=text, GPT-2 BPE) and reports that process's peak
RSS (from wait4's rusage, the kernel's high-water mark), wall time and MB/s of text. Last, the
ratio of each peak RSS to the smallest corpus's with the same workers: streaming keeps it
near 1.0 (bounded by chunk sizes, not by the corpus).

Needs $JAXLLM_SHARED_DATA (tinyshakespeare.txt) and, offline, $TIKTOKEN_CACHE_DIR. Writes
under a temporary folder (or --keep DIR): the corpus and its cache take about 1.5x its size.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

CHILD = """
import sys, time
from jaxllm import config as config_lib
from jaxllm.data import load_token_data
data = config_lib.default_config().data
data.update(dict(dataset="text", path=sys.argv[1], data_dir=sys.argv[2], tokenizer=sys.argv[3],
                 tokenize_workers=int(sys.argv[4])))
start = time.perf_counter()
tokens = load_token_data(data)
print(f"TOKENS {len(tokens.train) + len(tokens.val)} SECONDS {time.perf_counter() - start:.2f}")
"""


def write_corpus(path: pathlib.Path, megabytes: int, source: str) -> int:
  """`megabytes` MB of text: numbered copies of `source`. Returns its size in bytes."""
  target, written, copy = megabytes * 1_000_000, 0, 0
  with open(path, "w", encoding="utf-8") as f:
    while written < target:
      block = f"\n\n=== Copy {copy} ===\n\n{source}"
      f.write(block)
      written += len(block.encode("utf-8"))
      copy += 1
  return written


def prepare(corpus: pathlib.Path, data_dir: pathlib.Path, tokenizer: str,
            workers: int) -> dict:
  shutil.rmtree(data_dir, ignore_errors=True)
  start = time.perf_counter()
  child = subprocess.Popen([sys.executable, "-c", CHILD, str(corpus), str(data_dir), tokenizer,
                            str(workers)], stdout=subprocess.PIPE, text=True)
  output = child.stdout.read()
  _, status, usage = os.wait4(child.pid, 0)
  wall = time.perf_counter() - start
  if status:
    raise SystemExit(f"preparation failed (status {status}): {output[-500:]}")
  fields = output.split()
  tokens, seconds = int(fields[fields.index("TOKENS") + 1]), float(fields[fields.index("SECONDS") + 1])
  return {"peak_rss_mb": usage.ru_maxrss / 1024, "wall_s": wall, "prepare_s": seconds,
          "tokens": tokens}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes-mb", type=int, nargs="+", default=[100, 2000])
  parser.add_argument("--workers", type=int, nargs="+", default=[0],
                      help="tokenizing threads per run (0 = every core)")
  parser.add_argument("--tokenizer", default="gpt2")
  parser.add_argument("--keep", help="work in this folder and keep it")
  args = parser.parse_args(argv)
  shared = pathlib.Path(os.environ.get("JAXLLM_SHARED_DATA", "../shared/data"))
  source = (shared / "tinyshakespeare.txt").read_text(encoding="utf-8")
  root = pathlib.Path(args.keep or tempfile.mkdtemp(prefix="jaxllm-tokenize-"))
  root.mkdir(parents=True, exist_ok=True)
  print(f"{os.cpu_count()} cores; tokenizer {args.tokenizer}; work folder {root}")
  print(f"{'corpus':>9} {'workers':>7} {'tokens':>13} {'prepare s':>9} {'MB/s':>7} "
        f"{'peak RSS MB':>11}")
  results = {}
  try:
    for megabytes in args.sizes_mb:
      corpus = root / f"corpus-{megabytes}mb.txt"
      size = write_corpus(corpus, megabytes, source)
      os.sync()  # its write-back would otherwise compete with the tokenizer for the disk
      for workers in args.workers:
        r = prepare(corpus, root / "tfds", args.tokenizer, workers)
        results[megabytes, workers] = r
        print(f"{size / 1e6:>7.0f}MB {workers or os.cpu_count():>7} {r['tokens']:>13,} "
              f"{r['prepare_s']:>9.1f} {size / 1e6 / r['prepare_s']:>7.2f} "
              f"{r['peak_rss_mb']:>11.0f}", flush=True)
      corpus.unlink()
  finally:
    if not args.keep:
      shutil.rmtree(root, ignore_errors=True)
  smallest = min(args.sizes_mb)
  for (megabytes, workers), r in results.items():
    if megabytes != smallest:
      ratio = r["peak_rss_mb"] / results[smallest, workers]["peak_rss_mb"]
      print(f"peak RSS {megabytes} MB / {smallest} MB corpus ({workers or os.cpu_count()} "
            f"workers): {ratio:.3f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
