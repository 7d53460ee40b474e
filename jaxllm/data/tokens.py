"""From `config.data` to train and validation token arrays, tokenized once and cached on disk.

Documents come from a TFDS catalog dataset (`data.dataset`) or, for `data.dataset="text"`,
from local files through jaxllm's own TFDS builder; either way they are read with
`as_data_source` and joined with `data.separator`. Validation is either TFDS splits
(`data.val_split`) or the last `data.val_fraction` of the joined text, cut by characters as
nanoGPT and "Build a Large Language Model (From Scratch)" do. The token arrays land in
`<data_dir>/jaxllm_tokens/<key>/` with the tokenizer's JSON, so a second run reads them back
without touching the text (and the char tokenizer gets back the same vocabulary).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pathlib
import re
import shutil
from typing import Iterator

import ml_collections
from absl import logging as absl_logging
import numpy as np
import tensorflow_datasets as tfds
import tqdm

from jaxllm import tokenizer as tokenizer_lib
from jaxllm.data import text_builder
from jaxllm.errors import JaxllmError

# Bump when the cache layout or the meaning of a key changes.
CACHE_FORMAT = 1
# Texts are encoded in pieces of about this many characters, with a progress bar past
# PROGRESS_MIN_CHARS (below that, encoding takes a second or two).
CHUNK_CHARS = 1 << 20
PROGRESS_MIN_CHARS = 1 << 23
# Where a text can be cut so its pieces encode exactly as the whole does: just after a lone
# newline between non-spaces, or before a space between two ASCII letters. BPE pre-tokenizers
# (GPT-2's, cl100k's, o200k's) never put both sides of these in one piece. (After "\n\n" a cut
# is not safe: ending a piece, the two newlines merge into one token; inside, they do not.)
_SAFE_CUT = re.compile(r"(?<=\S)\n(?=\S)|(?<=[A-Za-z])(?= [A-Za-z])")


@dataclasses.dataclass
class TokenData:
  """Token ids of the training and validation text, and the tokenizer that made them."""

  train: np.ndarray
  val: np.ndarray
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


def split_names(spec: str) -> list[str]:
  """"train+validation" -> ["train", "validation"]."""
  names = [name.strip() for name in spec.split("+")]
  if not spec or not all(names):
    raise JaxllmError(f"bad split '{spec}' (splits are TFDS split names joined with '+', "
                      f"e.g. train+validation)")
  return names


def read_documents(builder: tfds.core.DatasetBuilder, spec: str) -> list[str]:
  """The `text` of every example of the splits in `spec`, split after split (builder prepared)."""
  available = list(builder.info.splits.keys())
  if "text" not in builder.info.features:
    raise JaxllmError(f"dataset '{builder.name}' has no 'text' feature (it has: "
                      f"{', '.join(builder.info.features.keys())}); pick a text dataset")
  documents = []
  for name in split_names(spec):
    if name.split("[")[0] not in available:
      raise JaxllmError(f"dataset '{builder.name}' has no split '{name}' (it has: "
                        f"{', '.join(available)}); fix data.train_split / data.val_split")
    source = builder.as_data_source(split=name)
    # Read in blocks: one ArrayRecord lookup per example is slow for millions of documents.
    with tqdm.tqdm(total=len(source), desc=f"reading {name}", unit="doc",
                   disable=len(source) < 100_000) as progress:
      for start in range(0, len(source), 4096):
        block = source.__getitems__(range(start, min(start + 4096, len(source))))
        for example in block:
          text = example["text"]
          documents.append(text.decode("utf-8") if isinstance(text, bytes) else text)
        progress.update(len(block))
  return documents


def load_text(data: ml_collections.ConfigDict, spec: str,
              builder: tfds.core.DatasetBuilder | None = None) -> str:
  """The documents of splits `spec` joined with `data.separator`; an empty text is an error."""
  builder = builder or dataset_builder(data)
  _prepare(builder, data)
  text = data.separator.join(read_documents(builder, spec))
  if not text.strip():
    where = data.path if data.dataset == "text" else f"{data.dataset} split {spec}"
    raise JaxllmError(f"corpus is empty ({where} has {'no' if not text else 'only whitespace'}"
                      f" text); point data.path / data.dataset at a text corpus")
  return text


def _chunks(text: str, size: int) -> Iterator[str]:
  start = 0
  while start < len(text):
    cut = _SAFE_CUT.search(text, start + size) if start + size < len(text) else None
    end = cut.end() if cut else len(text)
    yield text[start:end]
    start = end


def encode(tok: tokenizer_lib.Tokenizer, text: str, desc: str = "tokenizing") -> np.ndarray:
  """`tok.encode(text)` as the smallest unsigned array that holds the vocabulary."""
  dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
  pieces = []
  with tqdm.tqdm(total=len(text), desc=desc, unit="char", unit_scale=True,
                 disable=len(text) < PROGRESS_MIN_CHARS) as progress:
    for chunk in _chunks(text, CHUNK_CHARS):
      pieces.append(np.asarray(tok.encode(chunk), dtype=dtype))
      progress.update(len(chunk))
  return np.concatenate(pieces) if pieces else np.zeros((0,), dtype)


def _check_length(what: str, tokens: np.ndarray, context_length: int | None, fix: str) -> None:
  if context_length is not None and len(tokens) < context_length + 1:
    raise JaxllmError(f"{what} split has {len(tokens)} tokens, fewer than context_length + 1 = "
                      f"{context_length + 1}; lower model.context_length or {fix}")


def cache_key(data: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder,
              tokenizer: tokenizer_lib.Tokenizer | None = None) -> dict:
  """Everything the token arrays depend on. `full_name` of the local builder hashes the files;
  a given tokenizer (another run's) is keyed by its whole JSON, a character vocabulary too."""
  return {
      "format": CACHE_FORMAT, "dataset": builder.info.full_name,
      "train_split": data.train_split, "val_split": data.val_split,
      "val_fraction": None if data.val_split else float(data.val_fraction),
      "separator": data.separator,
      "tokenizer": data.tokenizer if tokenizer is None else tokenizer.to_json(),
  }


def load_token_data(data: ml_collections.ConfigDict, context_length: int | None = None,
                    tokenizer: tokenizer_lib.Tokenizer | None = None) -> TokenData:
  """Train/val tokens for `config.data`, from the cache or tokenized once and cached.

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

  if cache_dir.is_dir():
    tok = tokenizer_lib.from_json(json.loads((cache_dir / "tokenizer.json").read_text()))
    train = np.load(cache_dir / "train.npy", mmap_mode="r")
    val = np.load(cache_dir / "val.npy", mmap_mode="r")
  else:
    text = load_text(data, data.train_split, builder)
    if data.val_split:
      train_text, val_text = text, load_text(data, data.val_split, builder)
    else:
      cut = int(len(text) * (1.0 - data.val_fraction))
      train_text, val_text = text[:cut], text[cut:]
    # The char vocabulary covers validation too, or an unseen character could not be encoded.
    tok = tokenizer or tokenizer_lib.get_tokenizer(data.tokenizer, corpus=train_text + val_text)
    train = encode(tok, train_text, "tokenizing train")
    val = encode(tok, val_text, "tokenizing val")
    _write_cache(cache_dir, key, tok, train, val)

  _check_length("training", train, context_length, "use a longer corpus")
  val_fix = "name longer splits in data.val_split" if data.val_split else "raise data.val_fraction"
  _check_length("validation", val, context_length, val_fix)
  return TokenData(train=train, val=val, tokenizer=tok, cache_dir=cache_dir)


def _write_cache(cache_dir: pathlib.Path, key: dict, tok: tokenizer_lib.Tokenizer,
                 train: np.ndarray, val: np.ndarray) -> None:
  # Written aside and renamed into place, so a reader (another process of a multi-host job,
  # or a run killed mid-write) never sees half a cache.
  partial = cache_dir.with_name(f"{cache_dir.name}.partial-{os.getpid()}")
  partial.mkdir(parents=True, exist_ok=True)
  np.save(partial / "train.npy", train)
  np.save(partial / "val.npy", val)
  (partial / "tokenizer.json").write_text(json.dumps(tok.to_json()))
  (partial / "key.json").write_text(json.dumps(key, indent=1))
  try:
    os.rename(partial, cache_dir)
  except OSError:
    if not cache_dir.is_dir():
      raise
    shutil.rmtree(partial)  # another process got there first with the same arrays
