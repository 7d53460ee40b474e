"""Labelled data: reading, one-line errors for bad rows, balancing, the split, padding."""

import json

import numpy as np
import pytest

from jaxllm import config as config_lib
from jaxllm.data import classification
from jaxllm.data.tokenizer import TiktokenTokenizer
from jaxllm.errors import JaxllmError


def _sms_config():
  c = config_lib.default_config().classifier
  c.text_column, c.label_column, c.labels = "1", "0", "ham,spam"
  return c


def test_sms_balanced_split_is_the_books(shared_data):
  texts, label_N, labels = classification.read_labelled(
      shared_data / "SMSSpamCollection", text_column="1", label_column="0", labels=["ham", "spam"])
  assert labels == ["ham", "spam"]
  assert len(texts) == 5574 and np.bincount(label_N).tolist() == [4827, 747]
  keep = classification.balance(label_N, seed=123)
  assert np.bincount(label_N[keep]).tolist() == [747, 747]
  assert len(set(keep.tolist())) == 1494  # drawn without replacement
  parts = classification.split(len(keep), 0.7, 0.1, seed=123)
  assert [len(parts[s]) for s in ("train", "val", "test")] == [1045, 149, 300]
  assert len(set(np.concatenate(list(parts.values())).tolist())) == 1494
  # Seeded: the same call gives the same examples; another seed other ones.
  np.testing.assert_array_equal(keep, classification.balance(label_N, seed=123))
  assert not np.array_equal(keep, classification.balance(label_N, seed=124))


def test_load_pads_with_eot_to_the_longest_training_text(shared_data):
  tokenizer = TiktokenTokenizer("gpt2")
  data = classification.load(_sms_config(), str(shared_data / "SMSSpamCollection"), tokenizer,
                             context_length=1024)
  train = data.splits["train"]
  assert data.pad_id == 50256 and data.labels == ["ham", "spam"]
  assert train["tokens_BxL"].shape == (1045, data.max_length)
  assert data.max_length == train["length_B"].max()  # padded to the longest training text
  assert data.splits["test"]["tokens_BxL"].shape[1] == data.max_length
  row = int(np.argmin(train["length_B"]))
  n = train["length_B"][row]
  assert (train["tokens_BxL"][row, n:] == 50256).all()
  all_labels = np.concatenate([s["label_B"] for s in data.splits.values()])
  assert np.bincount(all_labels).tolist() == [747, 747]

  # A fixed length truncates (the book's max_length).
  tokens_NxL, length_N = classification.pad([[1, 2, 3, 4, 5], [6]], 3, pad_id=0)
  assert tokens_NxL.tolist() == [[1, 2, 3], [6, 0, 0]] and length_N.tolist() == [3, 1]

  batches = list(classification.batches(train, 8, seed=1, epoch=0, drop_last=True))
  assert len(batches) == 130 and all(b["tokens_BxL"].shape == (8, data.max_length) for b in batches)
  assert len(list(classification.batches(data.splits["val"], 8))) == 19  # 149 = 18 x 8 + 5


def test_csv_with_header_and_jsonl(tmp_path):
  csv_path = tmp_path / "reviews.csv"
  csv_path.write_text('id,review,sentiment\n1,"Great, really great",pos\n2,Awful,neg\n'
                      '3,"Two\nlines",pos\n')
  texts, label_N, labels = classification.read_labelled(
      csv_path, text_column="review", label_column="sentiment")
  assert texts == ["Great, really great", "Awful", "Two\nlines"]
  assert labels == ["neg", "pos"] and label_N.tolist() == [1, 0, 1]
  jsonl_path = tmp_path / "reviews.jsonl"
  jsonl_path.write_text("\n".join(json.dumps({"text": t, "label": l})
                                  for t, l in [("a", 1), ("b", 0), ("c", 1)]) + "\n")
  texts, label_N, labels = classification.read_labelled(jsonl_path)
  assert texts == ["a", "b", "c"] and labels == ["0", "1"] and label_N.tolist() == [1, 0, 1]


@pytest.mark.parametrize("content, fmt, message", [
    (b"ham\tfine\n\tno label here\n", "tsv", r"bad\.tsv:2: missing label \(column 0\)"),
    (b"ham\tfine\nspam\n", "tsv", r"bad\.tsv:2: missing text \(column 1\)"),
    (b"ham\tfine\nspam\tbuy now\nhma\ttypo\n", "tsv", r"bad\.tsv:3: unknown label 'hma'"),
    (b"ham\tfine\nspam\tcaf\xe9 offer\n", "tsv", r"bad\.tsv:2: byte 0xe9 .* not UTF-8"),
    (b"text,label\nfine,ham\nno label,\n", "csv", r"bad\.csv:3: missing label"),
    (b'{"text": "a", "label": "ham"}\n{"text": "b"}\n', "jsonl", r"bad\.jsonl:2: missing label"),
])
def test_malformed_rows_are_one_line_errors_naming_file_and_line(tmp_path, content, fmt, message):
  path = tmp_path / f"bad.{fmt}"
  path.write_bytes(content)
  columns = ({"text_column": "1", "label_column": "0"} if fmt == "tsv" else {})
  with pytest.raises(JaxllmError, match=message) as info:
    classification.read_labelled(path, labels=["ham", "spam"], **columns)
  assert "\n" not in str(info.value)


def test_missing_header_column_and_missing_file(tmp_path):
  path = tmp_path / "data.csv"
  path.write_text("body,label\nhello,ham\n")
  with pytest.raises(JaxllmError, match=r"data\.csv:1: header has no column 'text'"):
    classification.read_labelled(path)
  with pytest.raises(JaxllmError, match="data file not found"):
    classification.read_labelled(tmp_path / "nope.tsv")
