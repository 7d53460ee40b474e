"""From `config.data` to train and validation token arrays, tokenized once into a cache on disk.

Documents come from a TFDS catalog dataset (`data.dataset`) or, for `data.dataset="text"`,
from local files named through jaxllm's own TFDS builder, and are joined with
`data.separator` (`corpus`). Validation is either TFDS splits (`data.val_split`) or the last
`data.val_fraction` of the joined text, cut by characters as nanoGPT and "Build a Large
Language Model (From Scratch)" do.

The text streams through the tokenizer in memory bounded by the chunk size, not by the
corpus: one pass measures it (and collects a character vocabulary), a second re-cuts it into
chunks of about CHUNK_CHARS characters at places where cutting cannot change a token, encodes
the chunks on every core and appends their ids to sharded token files (`token_files`) in
`<data_dir>/jaxllm_tokens/<key>/`, with the tokenizer's JSON, so a second run maps them back
without touching the text. A killed preparation continues from its last committed shard.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import os
import pathlib
import re
import time
from typing import Iterable, Iterator

import filelock
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import logging as absl_logging

from jaxllm.data import corpus, text_builder, token_files
from jaxllm.data import tokenizer as tokenizer_lib
from jaxllm.errors import JaxllmError
from jaxllm.progress import progress_bar

# Bump when the meaning of a key changes. (Caches written as train.npy / val.npy before
# sharded token files hold the same ids under the same key, and are still read.)
CACHE_FORMAT = 1
# Texts are encoded in chunks of about this many characters; with no safe place to cut
# (below), a chunk is cut at HARD_CHUNK_CHARS anyway.
CHUNK_CHARS = 1 << 20
HARD_CHUNK_CHARS = 64 * CHUNK_CHARS
# Where a text can be cut so its pieces encode exactly as the whole does: just after a lone
# newline between non-spaces, or before a space between two ASCII letters. BPE pre-tokenizers
# (GPT-2's, cl100k's, o200k's) never put both sides of these in one piece. (After "\n\n" a cut
# is not safe: ending a piece, the two newlines merge into one token; inside, they do not.)
_SAFE_CUT = re.compile(r"(?<=\S)\n(?=\S)|(?<=[A-Za-z])(?= [A-Za-z])")


@dataclasses.dataclass
class TokenData:
  """Token ids of the training and validation text (memory-mapped: indexing reads only what
  it picks), and the tokenizer that made them."""

  train: token_files.TokenShards | np.ndarray
  val: token_files.TokenShards | np.ndarray
  tokenizer: tokenizer_lib.Tokenizer
  cache_dir: pathlib.Path


def tfds_data_dir(data: ml_collections.ConfigDict) -> str:
  """`data.data_dir`, else $TFDS_DATA_DIR (read now, not at TFDS import), else TFDS's default."""
  data_dir = data.data_dir or os.environ.get("TFDS_DATA_DIR") or tfds.core.constants.DATA_DIR
  return os.path.expanduser(data_dir)


@contextlib.contextmanager
def _quiet_tfds():
  """No TFDS progress bars or config warnings: local files prepare in a blink, and their
  noise would bury jaxllm's own output (and its one-line errors)."""
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)
  tfds.display_progress_bar(False)
  try:
    yield
  finally:
    tfds.display_progress_bar(True)
    absl_logging.set_verbosity(verbosity)


def dataset_builder(data: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """The TFDS builder `data` names (not yet prepared)."""
  data_dir = tfds_data_dir(data)
  if data.dataset == "text":
    with _quiet_tfds():
      return text_builder.local_builder(data.path, data_dir)
  try:
    return tfds.builder(data.dataset, data_dir=data_dir, file_format="array_record")
  except tfds.core.registered.DatasetNotFoundError as e:
    guess = re.search(r"Did you mean: \S+ -> (\S+)", str(e))
    hint = f"did you mean '{guess.group(1)}'? " if guess else ""
    raise JaxllmError(
        f"unknown TFDS dataset '{data.dataset}' ({hint}data.dataset takes a TFDS catalog name "
        f"such as tiny_shakespeare, or use data.dataset=text with data.path=FILE for local "
        f"text)") from None
  except ValueError as e:  # e.g. a bad config name, or a TFRecord copy prepared by tfds.load
    hint = ("it holds a TFRecord copy and jaxllm reads ArrayRecord; set data.data_dir to "
            "another folder and jaxllm prepares its own copy there"
            if "File format is already set" in str(e) else "check data.dataset")
    raise JaxllmError(f"could not open TFDS dataset '{data.dataset}' in {data_dir} "
                      f"({str(e).splitlines()[0][:300]}); {hint}") from None


def _prepare(builder: tfds.core.DatasetBuilder, data: ml_collections.ConfigDict) -> None:
  if data.dataset == "text":
    with _quiet_tfds():
      builder.download_and_prepare()
    return
  try:
    builder.download_and_prepare()
  except JaxllmError:
    raise
  except Exception as e:  # TFDS raises whatever its downloader or the network raised
    reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
    raise JaxllmError(
        f"could not download or prepare TFDS dataset '{data.dataset}' in "
        f"{tfds_data_dir(data)} ({reason}); offline, set TFDS_DATA_DIR or data.data_dir to a "
        f"folder where it is prepared, or put its files in <data_dir>/downloads "
        f"(scripts/seed_tfds_downloads.py, or TFDS's manual download instructions)") from e


def text_stream(data: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder,
                spec: str) -> corpus.TextStream:
  """The text of splits `spec`, documents joined by `data.separator`, as a stream of pieces.

  Local files are read directly (see `corpus`); a split spec other than "train" for them
  (e.g. "train[:50%]") goes through TFDS's prepared copy, as catalog datasets do.
  """
  if data.dataset == "text" and corpus.split_names(spec) == ["train"]:
    files = [pathlib.Path(f) for f in builder.builder_config.files]
    return corpus.local_stream(files, data.separator)
  _prepare(builder, data)
  return corpus.tfds_stream(builder, spec, data.separator)


def _empty_corpus(data: ml_collections.ConfigDict, spec: str, has_chars: bool) -> JaxllmError:
  where = data.path if data.dataset == "text" else f"{data.dataset} split {spec}"
  return JaxllmError(f"corpus is empty ({where} has {'only whitespace' if has_chars else 'no'}"
                     f" text); point data.path / data.dataset at a text corpus")


def load_text(data: ml_collections.ConfigDict, spec: str,
              builder: tfds.core.DatasetBuilder | None = None) -> str:
  """The documents of splits `spec` joined with `data.separator`, as one string in memory
  (for small corpora and tests; tokenizing streams instead). An empty text is an error."""
  text = "".join(text_stream(data, builder or dataset_builder(data), spec))
  if not text.strip():
    raise _empty_corpus(data, spec, bool(text))
  return text


def safe_chunks(pieces: Iterable[str], size: int) -> Iterator[str]:
  """The text of `pieces` re-cut into chunks of about `size` characters at safe places (see
  _SAFE_CUT), so the chunks encode exactly as the whole text does. Text with no safe place
  in HARD_CHUNK_CHARS characters is cut there anyway (memory stays bounded; the tokens at
  that one cut may then differ from the whole text's)."""
  hard = max(HARD_CHUNK_CHARS, size + 1)
  # Pieces wait in a list and are joined once there is a chunk's worth: adding each to one
  # string would copy the text gathered so far for every piece, and a chunk of short
  # documents (two pieces each, the text and the separator) has tens of thousands of them.
  parts: list[str] = []
  length, look_at = 0, size + 1  # characters in `parts`; when to look for a cut again
  for piece in pieces:
    parts.append(piece)
    length += len(piece)
    if length < look_at:
      continue
    text, start = "".join(parts), 0
    while len(text) - start > size:
      # Searched no further than a hard cut, so that text with no safe place costs one scan.
      cut = _SAFE_CUT.search(text, start + size, start + hard)
      if cut is not None:
        end = cut.end()
      elif len(text) - start >= hard:
        end = start + hard
      else:
        break  # wait for more text
      yield text[start:end]
      start = end
    rest = text[start:]
    parts, length = [rest], len(rest)
    # Waiting for a safe place: look again once the text has doubled (or reaches a hard cut),
    # not at every piece, so the joins stay linear in the text.
    look_at = size + 1 if length <= size else min(2 * length, hard)
  rest = "".join(parts)
  if rest:
    yield rest


def token_dtype(tok: tokenizer_lib.Tokenizer) -> np.dtype:
  """The smallest unsigned integer type that holds the vocabulary."""
  return np.dtype(np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32)


def encode_chunks(tok: tokenizer_lib.Tokenizer, chunks: Iterable[str],
                  workers: int = 1) -> Iterator[tuple[int, np.ndarray]]:
  """(characters, token ids) of each chunk, in order, encoded by `workers` threads (tiktoken
  releases the GIL while it encodes) with at most 2 x workers chunks in flight."""
  dtype = token_dtype(tok)

  def encode_one(chunk: str) -> tuple[int, np.ndarray]:
    return len(chunk), tok.encode_array(chunk).astype(dtype, copy=False)

  if workers <= 1:
    yield from map(encode_one, chunks)
    return
  with concurrent.futures.ThreadPoolExecutor(workers, "jaxllm-tokenize") as pool:
    pending: collections.deque = collections.deque()
    for chunk in chunks:
      pending.append(pool.submit(encode_one, chunk))
      if len(pending) >= 2 * workers:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()


def encode(tok: tokenizer_lib.Tokenizer, text: str, workers: int = 1) -> np.ndarray:
  """`tok.encode(text)` as an array of `token_dtype(tok)`, in chunks (see safe_chunks)."""
  pieces = [ids for _, ids in encode_chunks(tok, safe_chunks([text], CHUNK_CHARS), workers)]
  return np.concatenate(pieces) if pieces else np.zeros((0,), token_dtype(tok))


def _check_length(what: str, tokens: np.ndarray, context_length: int | None, fix: str) -> None:
  if context_length is not None and len(tokens) < context_length + 1:
    raise JaxllmError(f"{what} split has {len(tokens)} tokens, fewer than context_length + 1 = "
                      f"{context_length + 1}; lower model.context_length or {fix}")


def cache_key(data: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder,
              tokenizer: tokenizer_lib.Tokenizer | None = None) -> dict:
  """Everything the token arrays depend on. `full_name` of the local builder hashes the files;
  a given tokenizer (another run's) is keyed by its whole JSON, a character vocabulary too,
  and a tokenizer file (tokenizer.json, vocab.txt) by its bytes as well as its path, so that
  editing it in place tokenizes again."""
  key = {
      "format": CACHE_FORMAT, "dataset": builder.info.full_name,
      "train_split": data.train_split, "val_split": data.val_split,
      "val_fraction": None if data.val_split else float(data.val_fraction),
      "separator": data.separator,
      "tokenizer": data.tokenizer if tokenizer is None else tokenizer.to_json(),
  }
  path = pathlib.Path(data.tokenizer)
  if tokenizer is None and path.is_file():  # a missing one: get_tokenizer names it
    key["tokenizer_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
  return key


def load_token_data(data: ml_collections.ConfigDict, context_length: int | None = None,
                    tokenizer: tokenizer_lib.Tokenizer | None = None) -> TokenData:
  """Train/val tokens for `config.data`, from the cache or tokenized once into it.

  `tokenizer` (e.g. the one of a run to continue from) replaces data.tokenizer. With
  `context_length`, a split too short for one window (context_length + 1 tokens) is a
  JaxllmError here rather than a shape error in the first batch.
  """
  if not data.val_split and not 0.0 < data.val_fraction < 1.0:
    raise JaxllmError(f"data.val_fraction must be in (0, 1), got {data.val_fraction} (or name "
                      f"validation splits in data.val_split)")
  builder = dataset_builder(data)
  key = cache_key(data, builder, tokenizer)
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
  slug = re.sub(r"[^\w.-]", "_", "-".join(builder.info.full_name.split("/")[:-1]))
  cache_dir = pathlib.Path(tfds_data_dir(data)) / "jaxllm_tokens" / f"{slug}-{digest}"
  if not cache_dir.is_dir():
    # One preparer at a time per cache (others wait, then read what it wrote).
    with _lock(cache_dir.with_name(f"{cache_dir.name}.lock")):
      if not cache_dir.is_dir():
        _prepare_cache(data, builder, key, tokenizer, cache_dir)
  tok = tokenizer_lib.from_json(json.loads((cache_dir / "tokenizer.json").read_text()))
  train = token_files.open_split(cache_dir, "train")
  val = token_files.open_split(cache_dir, "val")
  _check_length("training", train, context_length, "use a longer corpus")
  val_fix = "name longer splits in data.val_split" if data.val_split else "raise data.val_fraction"
  _check_length("validation", val, context_length, val_fix)
  return TokenData(train=train, val=val, tokenizer=tok, cache_dir=cache_dir)


@contextlib.contextmanager
def _lock(path: pathlib.Path):
  """An exclusive lock on `path` between processes and threads. filelock takes the operating
  system's lock (flock on Unix, msvcrt on Windows), which the system releases too if this
  process dies: a killed preparation leaves no stale lock."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with filelock.FileLock(path):
    yield


def available_cores() -> int:
  """The cores this process may run on (os.sched_getaffinity, where the system has it: not
  on macOS or Windows), else every core."""
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


class _CharSurvey:
  """The characters of a text seen piece by piece, `<|endoftext|>` left out, as
  `CharTokenizer.from_corpus` takes them (a marker cut between two pieces is still seen)."""

  def __init__(self):
    self.chars: set[str] = set()
    self._carry = ""  # the end of the last piece, perhaps the start of a marker

  def add(self, piece: str) -> None:
    parts = (self._carry + piece).split(tokenizer_lib.EOT)
    for part in parts[:-1]:
      self.chars.update(part)
    last = parts[-1]
    keep = min(len(last), len(tokenizer_lib.EOT) - 1)
    self.chars.update(last[:len(last) - keep])
    self._carry = last[len(last) - keep:]

  def result(self) -> str:
    return "".join(sorted(self.chars | set(self._carry)))


def _plan(data: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder,
          tokenizer: tokenizer_lib.Tokenizer | None) -> dict:
  """One pass over the text: where each split's text lies ([split spec, first character,
  end]) and, for a character tokenizer built here, its characters (validation's too)."""
  survey = _CharSurvey() if tokenizer is None and data.tokenizer == "char" else None
  on_piece = survey.add if survey else None

  def measure(spec: str) -> int:
    length, has_text = corpus.survey(text_stream(data, builder, spec), on_piece,
                                     desc=f"reading {spec}")
    if not has_text:
      raise _empty_corpus(data, spec, length > 0)
    return length

  length = measure(data.train_split)
  if data.val_split:
    splits = {"train": [data.train_split, 0, length],
              "val": [data.val_split, 0, measure(data.val_split)]}
  else:
    cut = int(length * (1.0 - data.val_fraction))
    splits = {"train": [data.train_split, 0, cut], "val": [data.train_split, cut, length]}
  return {"splits": splits, "chars": survey.result() if survey else None}


def _prepare_cache(data: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder,
                   key: dict, tokenizer: tokenizer_lib.Tokenizer | None,
                   cache_dir: pathlib.Path) -> None:
  """Tokenize into `<cache>.partial/` (continuing a killed preparation of the same key from
  its last committed shard), then rename it to `cache_dir`."""
  preparation = token_files.Preparation(cache_dir.with_name(f"{cache_dir.name}.partial"), key)
  if preparation.state["plan"] is None:
    preparation.state["plan"] = _plan(data, builder, tokenizer)
    preparation.save()
  plan = preparation.state["plan"]
  tok = tokenizer or (tokenizer_lib.CharTokenizer(plan["chars"]) if plan["chars"] is not None
                      else tokenizer_lib.get_tokenizer(data.tokenizer))
  workers = data.tokenize_workers or available_cores()
  for name in ("train", "val"):
    writer = token_files.ShardWriter(preparation, name, token_dtype(tok))
    if not writer.split["done"]:
      spec, start, stop = plan["splits"][name]
      stream = text_stream(data, builder, spec)
      pieces = corpus.CharRange(stream, start + writer.chars_done, stop)
      with progress_bar(total=stop - start, initial=writer.chars_done, desc=f"tokenizing {name}",
                        unit="char", unit_scale=True, delay=2, dynamic_ncols=True) as bar:
        begin, tokens = time.perf_counter(), 0
        for chars, ids in encode_chunks(tok, safe_chunks(pieces, CHUNK_CHARS), workers):
          writer.append(chars, ids)
          tokens += len(ids)
          bar.set_postfix(docs=f"{stream.documents:,}", refresh=False,
                          tok_s=f"{tokens / (time.perf_counter() - begin):,.0f}")
          bar.update(chars)
      writer.finish()
  preparation.finish(cache_dir, token_dtype(tok), tok.to_json())
