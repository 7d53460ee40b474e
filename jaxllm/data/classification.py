"""Labelled texts for a classifier: reading, class balancing, a seeded split, padding, batches.

Reads the UCI SMS Spam Collection (`label<TAB>text`, no header) and any CSV, TSV or JSONL
file with a text and a label column, then follows the book's ch. 6 recipe: downsample every
class to the rarest one's count (747 ham drawn with a seed + all 747 spam), shuffle with a
seed and cut 70/10/20, encode with the tokenizer and right-pad to the longest training text
(or a fixed length) with a pad id, truncating longer texts. A split is three arrays,
`{"tokens_BxL", "length_B", "label_B"}`; `length_B` lets the head read the last real token.

A file's problems (bytes that are not UTF-8, a missing or unknown label, a missing text)
are a one-line JaxllmError naming the file and the line.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import pathlib
from typing import Iterator, Sequence

import ml_collections
import numpy as np

from jaxllm.data import tokenizer as tokenizer_lib
from jaxllm.errors import JaxllmError

SPLITS = ("train", "val", "test")


def read_utf8(path: str | pathlib.Path) -> str:
  """A file's text; bytes that are not UTF-8 are an error naming the line they are on."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise JaxllmError(f"data file not found: {path}")
  raw = path.read_bytes()
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    line = raw[:e.start].count(b"\n") + 1
    column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
    raise JaxllmError(f"{path}:{line}: byte 0x{raw[e.start]:02x} at column {column} is not "
                      f"UTF-8 (re-save the file as UTF-8)") from None


def _format(path: pathlib.Path, fmt: str) -> str:
  if fmt != "auto":
    if fmt not in ("tsv", "csv", "jsonl"):
      raise JaxllmError(f"classifier.format must be auto, tsv, csv or jsonl, got '{fmt}'")
    return fmt
  return {".csv": "csv", ".jsonl": "jsonl"}.get(path.suffix.lower(), "tsv")


def _rows(path: pathlib.Path, text: str, fmt: str,
          header: bool) -> Iterator[tuple[int, list | dict]]:
  """(line number, row) of every non-blank row; the header row, if any, comes first."""
  if fmt == "jsonl":
    for number, line in enumerate(text.splitlines(), 1):
      if line.strip():
        try:
          row = json.loads(line)
        except json.JSONDecodeError as e:
          raise JaxllmError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
          raise JaxllmError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        yield number, row
    return
  if fmt == "tsv" and not header:
    # No quoting: the SMS texts hold quote characters that are part of the message.
    for number, line in enumerate(text.splitlines(), 1):
      if line.strip():
        yield number, line.split("\t")
    return
  reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if fmt == "tsv" else ",")
  start = 1
  for row in reader:
    if any(field.strip() for field in row):
      yield start, row
    start = reader.line_num + 1


def read_labelled(path: str | pathlib.Path, *, fmt: str = "auto", text_column: str = "text",
                  label_column: str = "label", labels: Sequence[str] = ()
                  ) -> tuple[list[str], np.ndarray, list[str]]:
  """(texts, class ids, class names) of a labelled file.

  A column is a header name (JSON key) or, all digits, a 0-based index into rows of a file
  without a header. Class ids follow `labels`; empty: the sorted distinct labels.
  """
  path = pathlib.Path(path)
  fmt = _format(path, fmt)
  by_index = text_column.isdigit() and label_column.isdigit()
  if fmt == "jsonl" and by_index:
    raise JaxllmError("JSONL rows are objects: give classifier.text_column/label_column as keys")
  if not by_index and (text_column.isdigit() or label_column.isdigit()):
    raise JaxllmError("give both classifier columns as indices (no header) or both as names")
  rows = _rows(path, read_utf8(path), fmt, header=not by_index)
  keys: tuple = (text_column, label_column)
  if fmt != "jsonl":
    if by_index:
      keys = (int(text_column), int(label_column))
    else:
      header_line, header = next(rows, (1, []))
      missing = [c for c in keys if c not in header]
      if missing:
        raise JaxllmError(f"{path}:{header_line}: header has no column {missing[0]!r} "
                          f"(it has: {', '.join(header)})")
      keys = (header.index(text_column), header.index(label_column))

  texts, names = [], []
  known = list(labels)
  for number, row in rows:
    fields = []
    for what, key in zip(("text", "label"), keys):
      value = row.get(key) if isinstance(row, dict) else (row[key] if key < len(row) else None)
      if value is None or (isinstance(value, str) and not value.strip()):
        raise JaxllmError(f"{path}:{number}: missing {what} (column {key!r})")
      fields.append(value if what == "text" else str(value).strip())
    text, label = fields
    if known and label not in known:
      raise JaxllmError(f"{path}:{number}: unknown label {label!r} "
                        f"(classifier.labels is {','.join(known)})")
    texts.append(str(text))
    names.append(label)
  if not texts:
    raise JaxllmError(f"{path} holds no labelled rows")
  classes = known or sorted(set(names))
  if len(set(names)) < 2:
    raise JaxllmError(f"{path}: every row has the label {names[0]!r}; a classifier needs two")
  index = {name: i for i, name in enumerate(classes)}
  return texts, np.array([index[n] for n in names], np.int32), classes


def balance(label_N: np.ndarray, seed: int) -> np.ndarray:
  """Indices keeping every class at the rarest class's count, drawn with `seed`, by class."""
  counts = np.bincount(label_N)
  smallest = counts[counts > 0].min()
  rng = np.random.default_rng(seed)
  picked = [np.sort(rng.choice(np.flatnonzero(label_N == c), smallest, replace=False))
            for c in range(len(counts)) if counts[c]]
  return np.concatenate(picked)


def split(n: int, train_fraction: float, val_fraction: float, seed: int
          ) -> dict[str, np.ndarray]:
  """A seeded shuffle cut as the book cuts it: int(n * train), int(n * val), the rest."""
  if not (0 < train_fraction and 0 <= val_fraction and train_fraction + val_fraction < 1):
    raise JaxllmError(f"classifier.train_fraction={train_fraction} and val_fraction="
                      f"{val_fraction} must be positive and leave room for a test split")
  order = np.random.default_rng(seed).permutation(n)
  train_end = int(n * train_fraction)
  val_end = train_end + int(n * val_fraction)
  return {"train": order[:train_end], "val": order[train_end:val_end], "test": order[val_end:]}


def pad(token_lists: Sequence[Sequence[int]], length: int, pad_id: int
        ) -> tuple[np.ndarray, np.ndarray]:
  """Right-padded NxL tokens (each truncated to `length`) and each row's real length."""
  tokens_NxL = np.full((len(token_lists), length), pad_id, np.int32)
  length_N = np.zeros(len(token_lists), np.int32)
  for row, tokens in enumerate(token_lists):
    tokens = list(tokens)[:length]
    tokens_NxL[row, :len(tokens)] = tokens
    length_N[row] = len(tokens)
  return tokens_NxL, length_N


@dataclasses.dataclass
class ClassificationData:
  splits: dict[str, dict[str, np.ndarray]]  # train/val/test -> tokens_BxL, length_B, label_B
  labels: list[str]
  max_length: int
  pad_id: int


def load(classifier: ml_collections.ConfigDict, path: str, tokenizer: tokenizer_lib.Tokenizer,
         context_length: int) -> ClassificationData:
  """The three padded splits of the labelled file at `path` that `config.classifier` describes."""
  if not path:
    raise JaxllmError("set data.path to a labelled file (e.g. SMSSpamCollection)")
  labels = [name.strip() for name in classifier.labels.split(",") if name.strip()]
  texts, label_N, labels = read_labelled(
      path, fmt=classifier.format, text_column=str(classifier.text_column),
      label_column=str(classifier.label_column), labels=labels)
  keep = balance(label_N, classifier.seed) if classifier.balance else np.arange(len(texts))
  parts = split(len(keep), classifier.train_fraction, classifier.val_fraction, classifier.seed)
  if min(len(v) for v in parts.values()) == 0:
    raise JaxllmError(f"{len(keep)} examples leave an empty split; use more data or other "
                      f"classifier fractions")
  # BERT's WordPiece: [CLS] text [SEP], as its classifiers were trained on.
  encode = (tokenizer.encode if not hasattr(tokenizer, "encode_for_model")
            else lambda text: tokenizer.encode_for_model(text)[0])
  encoded = {name: [encode(texts[i]) for i in keep[idx]] for name, idx in parts.items()}
  max_length = classifier.max_length or min(max(map(len, encoded["train"])), context_length)
  if max_length > context_length:
    raise JaxllmError(f"classifier.max_length={max_length} exceeds the model's context length "
                      f"{context_length} (model.context_length; a BERT's "
                      f"max_position_embeddings): lower classifier.max_length")
  pad_id = tokenizer.pad_id if classifier.pad_id < 0 else int(classifier.pad_id)
  splits = {}
  for name, idx in parts.items():
    tokens_NxL, length_N = pad(encoded[name], max_length, pad_id)
    splits[name] = {"tokens_BxL": tokens_NxL, "length_B": length_N,
                    "label_B": label_N[keep[idx]]}
  return ClassificationData(splits, labels, max_length, pad_id)


def num_batches(split_arrays: dict[str, np.ndarray], batch_size: int, drop_last: bool) -> int:
  n = len(split_arrays["label_B"])
  return n // batch_size if drop_last else -(-n // batch_size)


def batches(split_arrays: dict[str, np.ndarray], batch_size: int, *, seed: int | None = None,
            epoch: int = 0, drop_last: bool = False) -> Iterator[dict[str, np.ndarray]]:
  """Batches of a split, shuffled by (seed, epoch) when a seed is given (the book's train
  loader: shuffled, drop_last), else in order with a short last batch."""
  n = len(split_arrays["label_B"])
  order = np.arange(n) if seed is None else np.random.default_rng((seed, epoch)).permutation(n)
  for b in range(num_batches(split_arrays, batch_size, drop_last)):
    rows = order[b * batch_size:(b + 1) * batch_size]
    yield {key: value[rows] for key, value in split_arrays.items()}
