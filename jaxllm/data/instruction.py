"""Instruction data: Alpaca records, prompt templates, loss-masked and length-bucketed batches.

Records are `{"instruction", "input", "output"}` objects in a JSON list or a JSONL file. A
record becomes prompt + response + <|endoftext|> (EOS), tokenized as one text as the book
does. Batches are `{"inputs_BxL", "targets_BxL", "weights_BxL"}`: weights are 0 on padding
(the book's -100 targets after the first EOT) and, with `mask_prompt`, on targets inside
the prompt, so those positions add nothing to the loss or its gradient. Training batches
group texts of similar length (sorted within pools of shuffled examples) and pad to a
multiple of `pad_multiple`: little padding, and few distinct shapes for jit to compile.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Sequence

import ml_collections
import numpy as np

from jaxllm.data import tokenizer as tokenizer_lib
from jaxllm.data.classification import read_utf8
from jaxllm.errors import JaxllmError

REQUIRED_KEYS = ("instruction", "output")
TEMPLATES = ("alpaca", "phi3")
# What each template puts before the response (stripped from generated responses).
RESPONSE_MARKERS = {"alpaca": "### Response:", "phi3": "<|assistant|>"}


def format_prompt(entry: dict[str, Any], template: str = "alpaca") -> str:
  """The prompt: instruction and optional input. "alpaca" is the book's `format_input`."""
  if template == "alpaca":
    instruction_text = (f"Below is an instruction that describes a task. "
                        f"Write a response that appropriately completes the request."
                        f"\n\n### Instruction:\n{entry['instruction']}")
    input_text = f"\n\n### Input:\n{entry['input']}" if entry.get("input") else ""
    return instruction_text + input_text
  if template == "phi3":  # the book's exercise 7.1
    input_text = f"\n{entry['input']}" if entry.get("input") else ""
    return f"<|user|>\n{entry['instruction']}" + input_text
  raise JaxllmError(f"unknown prompt template '{template}' (instruct.template takes: "
                    f"{', '.join(TEMPLATES)})")


def format_response(entry: dict[str, Any], template: str = "alpaca") -> str:
  """What follows the prompt in training: the response marker and the expected output."""
  if template == "alpaca":
    return f"\n\n### Response:\n{entry['output']}"
  if template == "phi3":
    return f"\n<|assistant|>\n{entry['output']}"
  raise JaxllmError(f"unknown prompt template '{template}' (instruct.template takes: "
                    f"{', '.join(TEMPLATES)})")


def clean_response(generated: str, template: str = "alpaca") -> str:
  """A generated continuation without the response marker (the book's post-processing)."""
  return generated.replace(RESPONSE_MARKERS[template], "").strip()


def _json_list(path: pathlib.Path, text: str) -> list[tuple[int, Any]]:
  """(line, value) of each element of a top-level JSON list, lines counted from 1."""
  decoder = json.JSONDecoder()

  def fail(index: int, what: str):
    raise JaxllmError(f"{path}:{text.count(chr(10), 0, index) + 1}: {what}")

  def skip(index: int) -> int:
    while index < len(text) and text[index] in " \t\r\n":
      index += 1
    return index

  index = skip(0)
  if index >= len(text) or text[index] != "[":
    fail(index, "expected a JSON list of records (or use a .jsonl file, one record a line)")
  values, index = [], skip(index + 1)
  if index < len(text) and text[index] == "]":
    return values
  while True:
    try:
      value, end = decoder.raw_decode(text, index)
    except json.JSONDecodeError as e:
      fail(e.pos, f"not valid JSON ({e.msg})")
    values.append((text.count("\n", 0, index) + 1, value))
    index = skip(end)
    if index < len(text) and text[index] == ",":
      index = skip(index + 1)
    elif index < len(text) and text[index] == "]":
      return values
    else:
      fail(index, "expected ',' or ']' after a record")


def read_records(path: str | pathlib.Path,
                 required: Sequence[str] = REQUIRED_KEYS) -> list[dict[str, str]]:
  """Alpaca records from a JSON list or JSONL, each with the `required` string fields; a bad
  record's line is in the error."""
  path = pathlib.Path(path)
  text = read_utf8(path)
  if path.suffix.lower() == ".jsonl":
    values = []
    for number, line in enumerate(text.splitlines(), 1):
      if line.strip():
        try:
          values.append((number, json.loads(line)))
        except json.JSONDecodeError as e:
          raise JaxllmError(f"{path}:{number}: not valid JSON ({e.msg})") from None
  else:
    values = _json_list(path, text)
  records = []
  for number, value in values:
    if not isinstance(value, dict):
      raise JaxllmError(f"{path}:{number}: expected a record object, got {type(value).__name__}")
    for key in required:
      if not isinstance(value.get(key), str):
        raise JaxllmError(f"{path}:{number}: record has no {key!r} string (records need "
                          f"{', '.join(required)} and optionally input)")
    records.append({**value, "input": value.get("input") or ""})
  if not records:
    raise JaxllmError(f"{path} holds no records")
  return records


def split_records(records: Sequence[dict], train_fraction: float, test_fraction: float,
                  shuffle: bool = False, seed: int = 0) -> dict[str, list[dict]]:
  """The book's ch. 7 cut: train = first 85 %, test = next 10 %, validation = the rest."""
  if not (0 < train_fraction and 0 < test_fraction and train_fraction + test_fraction < 1):
    raise JaxllmError(f"instruct.train_fraction={train_fraction} and test_fraction="
                      f"{test_fraction} must be positive and leave room for validation")
  records = list(records)
  if shuffle:
    records = [records[i] for i in np.random.default_rng(seed).permutation(len(records))]
  train_end = int(len(records) * train_fraction)
  test_end = train_end + int(len(records) * test_fraction)
  return {"train": records[:train_end], "test": records[train_end:test_end],
          "val": records[test_end:]}


@dataclasses.dataclass
class Encoded:
  """Token ids of prompt + response + EOS per record, and each prompt's token count."""

  tokens: list[np.ndarray]
  prompt_length: np.ndarray

  def __len__(self) -> int:
    return len(self.tokens)

  @property
  def lengths(self) -> np.ndarray:
    return np.array([len(t) for t in self.tokens])


def encode(records: Sequence[dict], tokenizer: tokenizer_lib.Tokenizer, template: str
           ) -> Encoded:
  tokens, prompt_length = [], []
  for entry in records:
    prompt = format_prompt(entry, template)
    ids = tokenizer.encode(prompt + format_response(entry, template)) + [tokenizer.eot_id]
    tokens.append(np.asarray(ids, np.int32))
    prompt_length.append(len(tokenizer.encode(prompt)))
  return Encoded(tokens, np.asarray(prompt_length, np.int32))


def make_batch(data: Encoded, rows: Sequence[int], *, pad_id: int, max_length: int,
               pad_multiple: int = 1, mask_prompt: bool = False) -> dict[str, np.ndarray]:
  """Shifted inputs/targets, right-padded to the longest row (rounded up to pad_multiple,
  at most max_length), with loss weights 1 on real targets and 0 on padding (and prompt)."""
  lengths = [min(len(data.tokens[r]) - 1, max_length) for r in rows]
  length = min(-(-max(lengths) // pad_multiple) * pad_multiple, max_length)
  inputs_BxL = np.full((len(rows), length), pad_id, np.int32)
  targets_BxL = np.full((len(rows), length), pad_id, np.int32)
  weights_BxL = np.zeros((len(rows), length), np.float32)
  for i, (row, n) in enumerate(zip(rows, lengths)):
    tokens = data.tokens[row]
    inputs_BxL[i, :n] = tokens[:n]
    targets_BxL[i, :n] = tokens[1:n + 1]
    # Target j is token j + 1: it lies in the prompt while j + 1 < prompt_length.
    first = int(data.prompt_length[row]) - 1 if mask_prompt else 0
    weights_BxL[i, max(first, 0):n] = 1.0
  return {"inputs_BxL": inputs_BxL, "targets_BxL": targets_BxL, "weights_BxL": weights_BxL}


class Batches:
  """Training batches of one epoch as a pure function of (seed, epoch): shuffled, the last
  partial batch dropped (as the book's loader), and, with `bucket_batches` > 0, sorted by
  length within pools of that many batches, the batch order shuffled again."""

  def __init__(self, lengths: np.ndarray, batch_size: int, seed: int, bucket_batches: int = 0):
    if len(lengths) < batch_size:
      raise JaxllmError(f"{len(lengths)} training records are fewer than train.batch_size="
                        f"{batch_size}")
    self.lengths, self.batch_size, self.seed = np.asarray(lengths), batch_size, seed
    self.bucket_batches = bucket_batches
    self.batches_per_epoch = len(lengths) // batch_size

  def epoch(self, epoch: int) -> list[np.ndarray]:
    """The row indices of each batch of `epoch`."""
    rng = np.random.default_rng((self.seed, epoch))
    order = rng.permutation(len(self.lengths))[:self.batches_per_epoch * self.batch_size]
    if self.bucket_batches > 0:
      pool = self.bucket_batches * self.batch_size
      order = np.concatenate([chunk[np.argsort(self.lengths[chunk], kind="stable")]
                              for chunk in np.split(order, range(pool, len(order), pool))])
    rows = order.reshape(self.batches_per_epoch, self.batch_size)
    if self.bucket_batches > 0:
      rows = rows[rng.permutation(self.batches_per_epoch)]
    return list(rows)


def eval_batches(data: Encoded, batch_size: int, limit: int = 0) -> list[np.ndarray]:
  """Row indices for evaluation: every record (or the first `limit`) once, sorted by length
  to waste little padding."""
  count = min(limit, len(data)) if limit else len(data)
  order = np.argsort([len(t) for t in data.tokens[:count]], kind="stable")
  return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def batch_options(instruct: ml_collections.ConfigDict, context_length: int, pad_id: int
                  ) -> dict[str, Any]:
  """make_batch's keywords from `config.instruct` (the book pads with <|endoftext|>)."""
  max_length = instruct.max_length or context_length
  if max_length > context_length:
    raise JaxllmError(f"instruct.max_length={max_length} exceeds the model's context length "
                      f"{context_length}")
  return {"pad_id": pad_id, "max_length": max_length, "pad_multiple": max(instruct.pad_multiple, 1),
          "mask_prompt": bool(instruct.mask_prompt)}


def load_records(instruct: ml_collections.ConfigDict, path: str, seed: int,
                 required: Sequence[str] = REQUIRED_KEYS) -> dict[str, list[dict]]:
  """The records of each split of the file at `path`, as `config.instruct` cuts them."""
  if not path:
    raise JaxllmError("set data.path to an Alpaca-format .json or .jsonl file")
  if instruct.template not in TEMPLATES:
    raise JaxllmError(f"unknown prompt template '{instruct.template}' (instruct.template "
                      f"takes: {', '.join(TEMPLATES)})")
  return split_records(read_records(path, required), instruct.train_fraction,
                       instruct.test_fraction, instruct.shuffle, seed)


def load(instruct: ml_collections.ConfigDict, path: str, tokenizer: tokenizer_lib.Tokenizer,
         seed: int) -> tuple[dict[str, list[dict]], dict[str, Encoded]]:
  """The records of each split and their encodings, as `config.instruct` says."""
  records = load_records(instruct, path, seed)
  return records, {name: encode(split, tokenizer, instruct.template)
                   for name, split in records.items()}
