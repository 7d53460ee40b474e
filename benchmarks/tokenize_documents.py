"""Tokenizing speed of many short documents against one large document of the same text.

    source scripts/setup.sh && python benchmarks/tokenize_documents.py [--lines 1000000]
        [--line-chars 40] [--tokenizer gpt2] [--workers 0] [--repeats 2]

A corpus like lm1b's (millions of one-sentence documents) reaches the tokenizer as two pieces
per document (the text, then data.separator), where one large local file comes in blocks of
1 MB: the same characters, a thousand times more pieces. Both go through the preparation's
own path (`tokens.safe_chunks` into `tokens.encode_chunks`, GPT-2 BPE on every core) from
memory, so the figures are the pipeline's and not the disk's: MB/s of UTF-8 text for each
and their ratio, which stays near 1.0 when the cost of a piece is small against the cost of
its characters. It checks both give the same tokens.

The documents are lines of about --line-chars characters, words of Tiny Shakespeare in
order; the large document is them joined with the separator. Needs $JAXLLM_SHARED_DATA
(tinyshakespeare.txt) and, offline, $TIKTOKEN_CACHE_DIR.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import pathlib
import statistics
import sys
import time

from jaxllm.data import corpus
from jaxllm.data import tokenizer as tokenizer_lib
from jaxllm.data import tokens as tokens_lib

BLOCK_CHARS = 1 << 20  # about what `corpus.read_utf8` yields of a local file at a time


def short_lines(source: str, count: int, line_chars: int) -> list[str]:
  """`count` lines of whole words of `source` (cycled), each about `line_chars` long."""
  lines, words, length = [], [], 0
  for word in itertools.cycle(source.split()):
    words.append(word)
    length += len(word) + 1
    if length > line_chars:
      lines.append(" ".join(words))
      words, length = [], 0
      if len(lines) == count:
        return lines
  raise AssertionError("unreachable")


def tokenize(stream: corpus.TextStream, tok, workers: int) -> tuple[float, int, str]:
  """(seconds, tokens, sha256 of the ids) of one pass of `stream` through the pipeline."""
  digest, tokens = hashlib.sha256(), 0
  start = time.perf_counter()
  chunks = tokens_lib.safe_chunks(stream, tokens_lib.CHUNK_CHARS)
  for _, ids in tokens_lib.encode_chunks(tok, chunks, workers):
    digest.update(ids.tobytes())
    tokens += len(ids)
  return time.perf_counter() - start, tokens, digest.hexdigest()


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lines", type=int, default=1_000_000)
  parser.add_argument("--line-chars", type=int, default=40)
  parser.add_argument("--separator", default=tokenizer_lib.EOT, help="data.separator")
  parser.add_argument("--tokenizer", default="gpt2")
  parser.add_argument("--workers", type=int, default=0, help="tokenizing threads (0 = every core)")
  parser.add_argument("--repeats", type=int, default=2)
  args = parser.parse_args(argv)
  shared = pathlib.Path(os.environ.get("JAXLLM_SHARED_DATA", "../shared/data"))
  source = (shared / "tinyshakespeare.txt").read_text(encoding="utf-8")
  lines = short_lines(source, args.lines, args.line_chars)
  text = args.separator.join(lines)
  megabytes = len(text.encode("utf-8")) / 1e6
  blocks = [text[i:i + BLOCK_CHARS] for i in range(0, len(text), BLOCK_CHARS)]
  streams = {
      "short documents": corpus.TextStream(lambda: (iter((line,)) for line in lines),
                                           args.separator),
      "one document": corpus.TextStream(lambda: iter((iter(blocks),)), args.separator),
  }
  tok = tokenizer_lib.get_tokenizer(args.tokenizer)
  workers = args.workers or tokens_lib.available_cores()
  print(f"{len(lines):,} documents of {statistics.mean(map(len, lines)):.1f} characters, "
        f"separator {args.separator!r}: {megabytes:.1f} MB; tokenizer {args.tokenizer}, "
        f"{workers} workers on {os.cpu_count()} cores", flush=True)
  runs: dict[str, list[float]] = {name: [] for name in streams}
  hashes = set()
  for _ in range(args.repeats):  # alternating, so a change in the machine's load hits both
    for name, stream in streams.items():
      seconds, count, digest = tokenize(stream, tok, workers)
      runs[name].append(megabytes / seconds)
      hashes.add(digest)
      print(f"{name:>15}: {seconds:7.2f} s, {count:,} tokens, {megabytes / seconds:6.2f} MB/s",
            flush=True)
  best = {name: max(speeds) for name, speeds in runs.items()}
  for name, speed in best.items():
    print(f"best {name}: {speed:.2f} MB/s")
  print(f"short documents / one document: {best['short documents'] / best['one document']:.3f}")
  print(f"same tokens: {len(hashes) == 1}")
  return 0 if len(hashes) == 1 else 1


if __name__ == "__main__":
  sys.exit(main())
