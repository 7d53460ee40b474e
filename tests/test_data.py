"""Tests for jaxllm/data: the local TFDS builder, token loading and caching, batching, errors."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from jaxllm import config as config_lib
from jaxllm import data as data_lib
from jaxllm.data import corpus
from jaxllm.data import tokenizer as tokenizer_lib
from jaxllm.data import tokens as tokens_lib
from jaxllm.errors import JaxllmError


def _data(data_dir, **overrides):
  data = config_lib.default_config().data
  data.data_dir = str(data_dir)
  for key, value in overrides.items():
    data[key] = value
  return data


def _text(data_dir, path, **overrides):
  return _data(data_dir, dataset="text", path=str(path), **overrides)


# --- the local text builder ------------------------------------------------------------------

def test_local_builder_round_trips_files_in_sorted_order(tmp_path):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  (corpus / "b.txt").write_bytes("second file\r\nwith CRLF\n".encode())
  (corpus / "a.txt").write_bytes("first — ünïcode\n\n".encode())
  (corpus / "notes.md").write_text("not a .txt file")
  data = _text(tmp_path / "tfds", corpus, separator="<SEP>")
  assert data_lib.load_text(data, "train") == (
      "first — ünïcode\n\n<SEP>second file\r\nwith CRLF\n")
  # A glob picks the same files, a single file just itself.
  assert data_lib.load_text(_text(tmp_path / "tfds", corpus / "*.txt", separator=""),
                            "train") == "first — ünïcode\n\nsecond file\r\nwith CRLF\n"
  assert data_lib.load_text(_text(tmp_path / "tfds", corpus / "b.txt"), "train") == (
      "second file\r\nwith CRLF\n")


def test_local_builder_reprepares_a_changed_file(tmp_path):
  path = tmp_path / "t.txt"
  path.write_text("old text")
  data = _text(tmp_path / "tfds", path)
  first = data_lib.dataset_builder(data)
  assert data_lib.load_text(data, "train") == "old text"
  path.write_text("new, longer text")
  second = data_lib.dataset_builder(data)
  assert second.builder_config.name != first.builder_config.name
  assert data_lib.load_text(data, "train") == "new, longer text"


def test_the_verdict_round_trips(shared_data, tmp_path):
  path = shared_data / "the-verdict.txt"
  text = data_lib.load_text(_text(tmp_path, path), "train")
  assert len(text) == 20_479
  assert text == path.read_text(encoding="utf-8")


# --- the TFDS catalog: tiny_shakespeare --------------------------------------------------------

def test_tiny_shakespeare_splits_join_back_to_the_file(shared_data, seeded_tfds_dir):
  data = _data(seeded_tfds_dir, dataset="tiny_shakespeare", separator="")
  builder = data_lib.dataset_builder(data)
  lengths = [len(data_lib.load_text(data, split, builder))
             for split in ("train", "validation", "test")]
  assert lengths == [1_003_854, 55_770, 55_770]
  text = data_lib.load_text(data, "train+validation+test", builder)
  assert text.encode("utf-8") == (shared_data / "tinyshakespeare.txt").read_bytes()


def test_tiny_shakespeare_char_tokens(seeded_tfds_dir):
  data = _data(seeded_tfds_dir, dataset="tiny_shakespeare", separator="", tokenizer="char",
               train_split="train+validation+test", val_fraction=0.1)
  loaded = data_lib.load_token_data(data, context_length=256)
  assert (len(loaded.train), len(loaded.val)) == (1_003_854, 111_540)
  assert loaded.tokenizer.vocab_size == 66  # 65 characters + <|endoftext|>
  assert loaded.train.dtype == np.uint16
  assert loaded.tokenizer.decode(loaded.train[:14]) == "First Citizen:"


def test_tiny_shakespeare_named_validation_split(seeded_tfds_dir):
  data = _data(seeded_tfds_dir, dataset="tiny_shakespeare", tokenizer="char",
               train_split="train", val_split="validation+test", separator="")
  loaded = data_lib.load_token_data(data)
  assert (len(loaded.train), len(loaded.val)) == (1_003_854, 111_540)


# --- tokenization and the token cache ---------------------------------------------------------

def test_the_verdict_gpt2_tokens_and_cache_hit(shared_data, tmp_path, monkeypatch):
  path = shared_data / "the-verdict.txt"
  gpt2 = tokenizer_lib.get_tokenizer("gpt2")
  assert len(gpt2.encode(path.read_text(encoding="utf-8"))) == 5_145
  data = _text(tmp_path, path, tokenizer="gpt2", val_fraction=0.1)
  first = data_lib.load_token_data(data, context_length=256)
  # Cut at character 18,431 of 20,479: the cut splits one word, hence 5,146 = 5,145 + 1.
  assert (len(first.train), len(first.val)) == (4_612, 534)
  assert first.cache_dir.parent == tmp_path / "jaxllm_tokens"
  train_file = first.cache_dir / "train-00000.bin"
  mtime = train_file.stat().st_mtime_ns

  def must_not_run(*args, **kwargs):
    raise AssertionError("cache miss: the text was read or tokenized again")

  monkeypatch.setattr(tokens_lib, "text_stream", must_not_run)
  monkeypatch.setattr(tokens_lib, "encode_chunks", must_not_run)
  second = data_lib.load_token_data(data, context_length=256)
  assert train_file.stat().st_mtime_ns == mtime
  np.testing.assert_array_equal(second.train, first.train)
  np.testing.assert_array_equal(second.val, first.val)
  assert second.tokenizer.to_json() == {"kind": "tiktoken", "name": "gpt2"}


def test_char_vocabulary_comes_back_from_the_cache(tmp_path, monkeypatch):
  path = tmp_path / "t.txt"
  path.write_text("hello world, hello jax\n" * 10)
  data = _text(tmp_path / "tfds", path, tokenizer="char", val_fraction=0.2)
  first = data_lib.load_token_data(data)
  monkeypatch.setattr(tokens_lib, "encode_chunks", lambda *a, **k: pytest.fail("re-tokenized"))
  second = data_lib.load_token_data(data)
  assert second.tokenizer.to_json() == first.tokenizer.to_json()
  assert second.tokenizer.vocab_size == len(set("hello world, jax\n")) + 1
  assert second.tokenizer.decode(second.train[:11]) == "hello world"
  # A different setting is a different cache entry, tokenized afresh.
  monkeypatch.undo()
  other = data_lib.load_token_data(_text(tmp_path / "tfds", path, tokenizer="char",
                                         val_fraction=0.5))
  assert other.cache_dir != first.cache_dir and len(other.val) == 115


def test_a_tokenizer_file_edited_in_place_is_tokenized_again(tmp_path):
  """The cache key holds a tokenizer file's bytes, not only its path."""
  path = tmp_path / "t.txt"
  path.write_text("hello world, hello jax\n" * 10)
  vocab = tmp_path / "vocab.txt"
  specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
  vocab.write_text("\n".join([*specials, "hello", "world", ","]) + "\n")
  data = _text(tmp_path / "tfds", path, tokenizer=str(vocab), val_fraction=0.2)
  first = data_lib.load_token_data(data)
  vocab.write_text("\n".join([*specials, "hello", "world", ",", "jax"]) + "\n")
  second = data_lib.load_token_data(data)
  assert second.cache_dir != first.cache_dir
  unk = specials.index("[UNK]")
  assert unk in first.train and unk not in second.train


def test_data_dir_defaults_to_tfds_data_dir(tmp_path, monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  assert data_lib.tfds_data_dir(_data("")) == str(tmp_path)
  assert data_lib.tfds_data_dir(_data("~/tfds")) == os.path.expanduser("~/tfds")


def test_chunked_encoding_equals_one_shot(shared_data, monkeypatch):
  verdict = (shared_data / "the-verdict.txt").read_text(encoding="utf-8")
  shakespeare = (shared_data / "tinyshakespeare.txt").read_text(encoding="utf-8")
  text = verdict[:5000] + tokenizer_lib.EOT + shakespeare[:5000]
  gpt2 = tokenizer_lib.get_tokenizer("gpt2")
  # Size 1 cuts at every safe place there is: after lone newlines, before spaces in prose.
  monkeypatch.setattr(tokens_lib, "CHUNK_CHARS", 1)
  assert len(list(tokens_lib.safe_chunks([text], 1))) == 1_461
  np.testing.assert_array_equal(data_lib.encode(gpt2, text), gpt2.encode(text))



def test_many_short_documents_encode_as_each_one_with_the_separator(monkeypatch):
  # lm1b's shape: thousands of one-line documents per chunk, each its own piece.
  rng = np.random.default_rng(0)
  words = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "ran", "away", "."]
  documents = [" ".join(rng.choice(words, rng.integers(1, 12))) for _ in range(20_000)]
  stream = corpus.TextStream(lambda: (iter((d,)) for d in documents), tokenizer_lib.EOT)
  gpt2 = tokenizer_lib.get_tokenizer("gpt2")
  chunks = list(tokens_lib.safe_chunks(stream, 10_000))
  assert "".join(chunks) == tokenizer_lib.EOT.join(documents) and len(chunks) > 20
  ids = np.concatenate([i for _, i in tokens_lib.encode_chunks(gpt2, chunks, workers=2)])
  one_by_one = [gpt2.encode(d) + [gpt2.eot_id] for d in documents]
  np.testing.assert_array_equal(ids, np.concatenate(one_by_one)[:-1])


# --- portability: no os.sched_getaffinity on macOS, no fcntl on Windows -----------------------

def test_tokenize_workers_default_to_cpu_count_without_sched_getaffinity(tmp_path, monkeypatch):
  monkeypatch.delattr(os, "sched_getaffinity", raising=False)
  seen, original = [], tokens_lib.encode_chunks

  def recording(tok, chunks, workers=1):
    seen.append(workers)
    return original(tok, chunks, workers)

  monkeypatch.setattr(tokens_lib, "encode_chunks", recording)
  path = tmp_path / "t.txt"
  path.write_text("hello world, hello jax\n" * 10)
  data_lib.load_token_data(_text(tmp_path / "tfds", path, tokenizer="char"))
  assert seen == [os.cpu_count()] * 2  # train, val


def test_the_token_cache_needs_no_fcntl():
  # As on Windows: importing fcntl fails (filelock picks its platform's lock before that).
  code = "import sys, filelock; sys.modules['fcntl'] = None; import jaxllm.data.tokens"
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-2000:]


_HOLD_LOCK = """
import pathlib, sys, time
from jaxllm.data import tokens
with tokens._lock(pathlib.Path(sys.argv[1])):
  print("held", flush=True)
  time.sleep(120)
"""


def test_cache_lock_excludes_processes_and_threads_and_dies_with_its_holder(tmp_path):
  lock = tmp_path / "cache.lock"
  taken = threading.Event()

  def take():
    with tokens_lib._lock(lock):
      taken.set()

  holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(lock)],
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline() == "held\n"
    waiter = threading.Thread(target=take, daemon=True)
    waiter.start()
    assert not taken.wait(1.0)  # another process holds it
  finally:
    holder.kill()  # no release: the operating system's, at its death
    holder.wait()
  assert taken.wait(30)
  waiter.join()
  # Between threads of one process too.
  taken.clear()
  with tokens_lib._lock(lock):
    waiter = threading.Thread(target=take, daemon=True)
    waiter.start()
    assert not taken.wait(0.5)
  assert taken.wait(30)
  waiter.join()

# --- batching ---------------------------------------------------------------------------------

def test_random_batches_are_a_function_of_seed_and_step():
  tokens = np.arange(1000, dtype=np.uint16)
  sampler = data_lib.RandomBatches(tokens, batch_size=4, context_length=8, seed=3)
  batch = sampler.batch(7)
  assert batch["inputs"].shape == (4, 8) and batch["inputs"].dtype == np.int32
  np.testing.assert_array_equal(batch["targets"], batch["inputs"] + 1)  # shifted by one
  again = data_lib.RandomBatches(tokens, 4, 8, seed=3).batch(7)
  np.testing.assert_array_equal(again["inputs"], batch["inputs"])
  assert not np.array_equal(sampler.batch(8)["inputs"], batch["inputs"])
  assert not np.array_equal(data_lib.RandomBatches(tokens, 4, 8, 4).batch(7)["inputs"],
                            batch["inputs"])
  # nanoGPT's draw, reproduced by hand.
  offsets = np.random.default_rng((3, 7)).integers(0, 1000 - 8, size=4)
  np.testing.assert_array_equal(batch["inputs"][:, 0], offsets)
  micro = data_lib.RandomBatches(tokens, 4, 8, seed=3, microbatches=2).batch(7)
  assert micro["inputs"].shape == (2, 2, 8)
  np.testing.assert_array_equal(micro["inputs"].reshape(4, 8), batch["inputs"])


def test_a_process_reads_only_its_rows():
  # Multi-host: each process takes rows i..j of the global batch (of each microbatch).
  tokens = np.arange(1000, dtype=np.uint16)
  random = data_lib.RandomBatches(tokens, 8, 4, seed=3, microbatches=2)
  sliding = data_lib.SlidingBatches(tokens, 8, 4, stride=4, seed=3, microbatches=2)
  for sampler in (random, sliding):
    whole = sampler.batch(5)
    part = sampler.batch(5, rows=slice(1, 3))
    assert part["inputs"].shape == (2, 2, 4)
    for key in ("inputs", "targets"):
      np.testing.assert_array_equal(part[key], whole[key][:, 1:3])


def test_pad_batch_adds_zero_weight_rows():
  batch = {"inputs": np.ones((2, 4), np.int32), "targets": np.ones((2, 4), np.int32)}
  padded = data_lib.pad_batch(batch, 4)
  assert padded["inputs"].shape == (4, 4) and padded["inputs"].dtype == np.int32
  assert padded["weights"].sum(axis=1).tolist() == [4, 4, 0, 0]
  assert data_lib.pad_batch(batch, 2)["weights"].sum() == 8


def test_sliding_windows_on_the_verdict_match_the_book(shared_data, tmp_path):
  data = _text(tmp_path, shared_data / "the-verdict.txt", sampling="sliding", stride=0)
  loaded = data_lib.load_token_data(data, context_length=256)
  train = data_lib.train_batches(loaded.train, data, batch_size=2, context_length=256, seed=123)
  # The book's loaders: 18 training windows = 9 batches of 2 (4,608 tokens); validation 2
  # windows = 1 batch (512 tokens).
  assert (train.windows_per_epoch, train.batches_per_epoch) == (18, 9)
  val = list(data_lib.eval_batches(loaded.val, data, 2, 256, None, seed=0))
  assert [b["inputs"].shape for b in val] == [(2, 256)]
  np.testing.assert_array_equal(val[0]["inputs"][1], loaded.val[256:512])

  epoch0 = np.concatenate([train.batch(s)["inputs"][:, 0] for s in range(9)])
  assert sorted(epoch0.tolist()) == sorted(loaded.train[train.starts].tolist())
  for step in (0, 5, 9):
    batch = train.batch(step)
    np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
  # Back in epoch 0 after another epoch's permutation: the same batch as the first time.
  first = train.batch(4)["inputs"]
  train.batch(13)
  np.testing.assert_array_equal(train.batch(4)["inputs"], first)
  # A fresh object resumed at step 13 (epoch 1) sees what the first one saw.
  resumed = data_lib.train_batches(loaded.train, data, 2, 256, seed=123)
  np.testing.assert_array_equal(resumed.batch(13)["inputs"], train.batch(13)["inputs"])
  assert not np.array_equal(train.batch(9)["inputs"], train.batch(0)["inputs"])


def test_sliding_windows_stride_and_partial_eval_batch():
  assert data_lib.sliding_starts(10, 4, 3).tolist() == [0, 3]  # 3 + 4 < 10, 6 + 4 = 10
  assert data_lib.sliding_starts(11, 4, 3).tolist() == [0, 3, 6]
  assert data_lib.sliding_starts(5, 4).tolist() == [0]
  data = _data("", sampling="sliding", stride=2)
  tokens = np.arange(20, dtype=np.uint16)
  val = list(data_lib.eval_batches(tokens, data, 3, 4, None, seed=0))
  assert [b["inputs"][:, 0].tolist() for b in val] == [[0, 2, 4], [6, 8, 10], [12, 14]]
  assert len(list(data_lib.eval_batches(tokens, data, 3, 4, 2, seed=0))) == 2
  random = _data("", sampling="random")
  batches = list(data_lib.eval_batches(tokens, random, 3, 4, 5, seed=1))
  assert len(batches) == 5
  np.testing.assert_array_equal(batches[2]["inputs"],
                                data_lib.RandomBatches(tokens, 3, 4, 1).batch(2)["inputs"])


# --- errors -----------------------------------------------------------------------------------

def _error(match, fn, *args, **kwargs):
  with pytest.raises(JaxllmError, match=match) as info:
    fn(*args, **kwargs)
  assert "\n" not in str(info.value)
  return str(info.value)


def test_missing_corpus_errors(tmp_path):
  _error("corpus file not found: .*nope.txt .*data.path", data_lib.load_token_data,
         _text(tmp_path, tmp_path / "nope.txt"))
  _error("no .txt files in directory", data_lib.load_token_data, _text(tmp_path, tmp_path))
  _error("no files match data.path glob", data_lib.load_token_data,
         _text(tmp_path, tmp_path / "*.nothing"))
  _error("data.path is empty", data_lib.load_token_data, _text(tmp_path, ""))


def test_empty_corpus_errors(tmp_path):
  (tmp_path / "empty.txt").write_text("")
  (tmp_path / "blank.txt").write_text(" \n\t\n")
  _error("corpus is empty .*no text", data_lib.load_token_data,
         _text(tmp_path / "tfds", tmp_path / "empty.txt"))
  _error("corpus is empty .*only whitespace", data_lib.load_token_data,
         _text(tmp_path / "tfds", tmp_path / "blank.txt"))


def test_split_shorter_than_context_errors(tmp_path):
  (tmp_path / "t.txt").write_text("abcdefghij" * 10)  # 100 chars: 90 train, 10 val
  data = _text(tmp_path / "tfds", tmp_path / "t.txt", tokenizer="char", val_fraction=0.1)
  message = _error("validation split has 10 tokens, fewer than context_length \\+ 1 = 33",
                   data_lib.load_token_data, data, context_length=32)
  assert "data.val_fraction" in message and "model.context_length" in message
  _error("training split has 90 tokens, fewer than context_length \\+ 1 = 129",
         data_lib.load_token_data, data, context_length=128)
  _error("val_fraction must be in \\(0, 1\\)", data_lib.load_token_data,
         _text(tmp_path / "tfds", tmp_path / "t.txt", val_fraction=0.0))
  _error("fewer than train.batch_size=64", data_lib.train_batches,
         np.arange(100), _data("", sampling="sliding"), 64, 8, 0)


def test_unknown_dataset_and_split_errors(tmp_path):
  message = _error("unknown TFDS dataset 'tiny_shakespear'", data_lib.load_token_data,
                   _data(tmp_path, dataset="tiny_shakespear"))
  assert "did you mean 'tiny_shakespeare'" in message and "data.dataset=text" in message
  (tmp_path / "t.txt").write_text("some text " * 20)
  _error("has no split 'validation' \\(it has: train\\)", data_lib.load_token_data,
         _text(tmp_path / "tfds", tmp_path / "t.txt", val_split="validation"))
  _error("data.sampling must be", data_lib.train_batches, np.arange(100),
         _data("", sampling="shuffled"), 2, 8, 0)


def test_non_utf8_file_error_names_the_file(tmp_path):
  (tmp_path / "good.txt").write_text("fine\n")
  (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
  _error("corpus file .*latin1.txt is not UTF-8", data_lib.load_token_data,
         _text(tmp_path / "tfds", tmp_path))
