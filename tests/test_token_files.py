"""Streaming tokenization into sharded token files: same ids as before, resumable, bounded."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest

from jaxllm import config as config_lib
from jaxllm import data as data_lib
from jaxllm.data import corpus, token_files
from jaxllm.data import tokenizer as tokenizer_lib
from jaxllm.data import tokens as tokens_lib
from jaxllm.errors import JaxllmError

# sha256 of the train / val arrays jaxllm cached for nanoGPT's Shakespeare split (the whole
# file, last 10 % of characters for validation) before sharded token files, i.e. the bytes of
# train.npy / val.npy past their header, measured with that code.
TODAYS_SHAKESPEARE = {
    ("char", "train"): (1_003_854, "6ec305602a99ac2802745a134e1f5e33e2231b4855525b00b9aebb730ac2626f"),
    ("char", "val"): (111_540, "d37d30cc0c8327c270d493299c3dca54135f6d5f1c9ef60cda78076e311204b1"),
    ("gpt2", "train"): (301_966, "502a2bdc8210d1ac5d5674867cb74467dd31db575d25cf6dbb08c8bdbea8680f"),
    ("gpt2", "val"): (36_059, "68a53422394c26a655ebe641f5c6f49888e8f4e45fe5d6f02abda63ba3ebd65b"),
}


def _shakespeare(data_dir, tokenizer):
  data = config_lib.default_config().data
  data.update(dict(data_dir=str(data_dir), dataset="tiny_shakespeare", separator="",
                   train_split="train+validation+test", val_fraction=0.1, tokenizer=tokenizer))
  return data


def _prepare(data, cache_dir: pathlib.Path) -> pathlib.Path:
  builder = data_lib.dataset_builder(data)
  tokens_lib._prepare_cache(data, builder, tokens_lib.cache_key(data, builder), None, cache_dir)
  return cache_dir


def _split_bytes(cache_dir: pathlib.Path, split: str) -> bytes:
  index = json.loads((cache_dir / "index.json").read_text())
  return b"".join((cache_dir / shard["file"]).read_bytes() for shard in index[split])


@pytest.fixture
def small_shards(monkeypatch):
  """Shards of ~100k tokens and chunks of ~10k characters: Shakespeare spans many of each."""
  monkeypatch.setattr(token_files, "SHARD_TOKENS", 100_000)
  monkeypatch.setattr(tokens_lib, "CHUNK_CHARS", 10_000)


@pytest.mark.parametrize("tokenizer", ["char", "gpt2"])
def test_shakespeare_token_files_are_todays_bytes(seeded_tfds_dir, tmp_path, small_shards,
                                                   tokenizer):
  cache = _prepare(_shakespeare(seeded_tfds_dir, tokenizer), tmp_path / "cache")
  index = json.loads((cache / "index.json").read_text())
  assert index["dtype"] == "uint16"
  for split in ("train", "val"):
    length, digest = TODAYS_SHAKESPEARE[tokenizer, split]
    raw = _split_bytes(cache, split)
    assert len(raw) == 2 * length and hashlib.sha256(raw).hexdigest() == digest
    shards = index[split]
    assert sum(s["tokens"] for s in shards) == length
    assert all(s["tokens"] >= 100_000 for s in shards[:-1])  # each full shard committed
    # Read back through the memory maps, across shard boundaries.
    tokens = token_files.open_split(cache, split)
    whole = np.frombuffer(raw, np.uint16)
    assert len(tokens) == length
    np.testing.assert_array_equal(np.asarray(tokens), whole)
    rng = np.random.default_rng(0)
    picks = rng.integers(0, length - 65, size=(12, 1)) + np.arange(65)
    np.testing.assert_array_equal(tokens[picks], whole[picks])
    np.testing.assert_array_equal(tokens[5:30], whole[5:30])
  assert len(index["train"]) >= (3 if tokenizer == "gpt2" else 10)


_KILL_SCRIPT = """
import json, os, signal, sys
from jaxllm import config as config_lib, data as data_lib
from jaxllm.data import token_files, tokens as tokens_lib
token_files.SHARD_TOKENS, tokens_lib.CHUNK_CHARS = 100_000, 10_000
appends = 0
original = token_files.ShardWriter.append
def append(self, chars, ids):
  global appends
  original(self, chars, ids)
  appends += 1
  if appends == 25:  # shards 0 and 1 committed (10 chunks each), shard 2 half written
    os.kill(os.getpid(), signal.SIGKILL)
token_files.ShardWriter.append = append
data = config_lib.default_config().data
data.update(json.loads(sys.argv[1]))
builder = data_lib.dataset_builder(data)
tokens_lib._prepare_cache(data, builder, tokens_lib.cache_key(data, builder), None,
                          __import__("pathlib").Path(sys.argv[2]))
"""


def test_killed_preparation_continues_to_the_same_files(seeded_tfds_dir, tmp_path,
                                                        small_shards, monkeypatch):
  data = _shakespeare(seeded_tfds_dir, "char")
  killed = tmp_path / "killed"
  run = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, json.dumps(data.to_dict()),
                        str(killed)], capture_output=True, text=True, timeout=300)
  assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
  partial = tmp_path / "killed.partial"
  assert not killed.exists()  # nothing that looks like a finished cache
  progress = json.loads((partial / "progress.json").read_text())
  assert [s["file"] for s in progress["splits"]["train"]["shards"]] == [
      "train-00000.bin", "train-00001.bin"]
  assert (partial / "train-00002.bin").stat().st_size > 0  # the shard being written
  committed = {name: (partial / name).stat().st_mtime_ns
               for name in ("train-00000.bin", "train-00001.bin")}
  done_chars = progress["splits"]["train"]["chars"]

  encoded = []
  original = tokens_lib.encode_chunks

  def counting(tok, chunks, workers=1):
    for chars, ids in original(tok, chunks, workers):
      encoded.append(chars)
      yield chars, ids

  with monkeypatch.context() as patch:
    patch.setattr(tokens_lib, "encode_chunks", counting)
    _prepare(data, killed)  # the same call again: continues
  # It tokenized only what the committed shards do not hold, and kept those shards.
  assert sum(encoded) == 1_115_394 - done_chars
  assert {name: (killed / name).stat().st_mtime_ns for name in committed} == committed
  assert not partial.exists()

  fresh = _prepare(data, tmp_path / "fresh")
  for name in sorted(os.listdir(fresh)):
    assert (killed / name).read_bytes() == (fresh / name).read_bytes(), name
  assert sorted(os.listdir(fresh)) == sorted(os.listdir(killed))
  for split in ("train", "val"):
    assert hashlib.sha256(_split_bytes(killed, split)).hexdigest() == (
        TODAYS_SHAKESPEARE["char", split][1])


def test_a_different_key_starts_a_partial_cache_over(tmp_path):
  partial = tmp_path / "c.partial"
  first = token_files.Preparation(partial, {"tokenizer": "gpt2"})
  writer = token_files.ShardWriter(first, "train", np.uint16, shard_tokens=2)
  writer.append(5, np.arange(3))
  assert token_files.Preparation(partial, {"tokenizer": "gpt2"}).split("train")["chars"] == 5
  again = token_files.Preparation(partial, {"tokenizer": "char"})
  assert again.state["splits"] == {} and os.listdir(partial) == []


def test_chunks_cut_anywhere_in_the_stream_encode_as_the_whole(shared_data, monkeypatch):
  verdict = (shared_data / "the-verdict.txt").read_text(encoding="utf-8")
  text = verdict + tokenizer_lib.EOT + verdict[:3000]
  gpt2 = tokenizer_lib.get_tokenizer("gpt2")
  rng = np.random.default_rng(1)
  cuts = np.sort(rng.integers(0, len(text), size=40))
  pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
  chunks = list(tokens_lib.safe_chunks(pieces, 500))
  assert "".join(chunks) == text and 30 < len(chunks) < 60
  ids = np.concatenate([i for _, i in tokens_lib.encode_chunks(gpt2, chunks, workers=2)])
  np.testing.assert_array_equal(ids, gpt2.encode(text))
  # No safe place to cut (one long word): cut at HARD_CHUNK_CHARS all the same.
  monkeypatch.setattr(tokens_lib, "HARD_CHUNK_CHARS", 1000)
  assert [len(c) for c in tokens_lib.safe_chunks(["x" * 700, "y" * 1800], 100)] == [
      1000, 1000, 500]
  # The same from many small pieces (waiting for a safe place joins them now and then).
  assert [len(c) for c in tokens_lib.safe_chunks(["x" * 10] * 250, 100)] == [1000, 1000, 500]


def test_char_vocabulary_survey_leaves_out_a_marker_cut_between_pieces():
  survey = tokens_lib._CharSurvey()
  for piece in ["ab<|endof", "text|>c", "d<", "|"]:
    survey.add(piece)
  assert survey.result() == "".join(sorted("abcd<|"))
  assert survey.result() == tokenizer_lib.CharTokenizer.from_corpus(
      "ab<|endoftext|>cd<|").chars


def test_utf8_reader_blocks_and_bad_byte_offset(tmp_path):
  path = tmp_path / "t.txt"
  text = "héllo wörld — " * 100  # 1,800 bytes
  path.write_bytes(text.encode())
  assert "".join(corpus.read_utf8(path, block_bytes=7)) == text  # characters cut by blocks
  raw = text.encode()
  path.write_bytes(raw[:1000] + b"\xff" + raw[1000:])
  with pytest.raises(JaxllmError, match=r"t\.txt is not UTF-8 \(bad byte at offset 1000\)"):
    list(corpus.read_utf8(path, block_bytes=7))


def _one_line_error(match, fn, *args):
  with pytest.raises(JaxllmError, match=match) as info:
    fn(*args)
  assert "\n" not in str(info.value)


def test_bad_corpus_files_are_one_line_errors(tmp_path):
  data = config_lib.default_config().data
  data.update(dict(dataset="text", data_dir=str(tmp_path / "tfds"), tokenizer="char"))
  folder = tmp_path / "corpus"
  folder.mkdir()
  (folder / "a.txt").write_text("readable text\n" * 20)
  # A file whose read fails (EIO): /proc/self/mem reads fail at offset 0, even for root.
  (folder / "b.txt").symlink_to("/proc/self/mem")
  data.path = str(folder)
  _one_line_error(r"cannot read corpus file /proc/\d+/mem at byte 0 \(", data_lib.load_token_data,
                  data)
  (folder / "b.txt").unlink()
  (folder / "c.txt").write_bytes(b"ok\n" * 3000 + b"caf\xe9\n")
  _one_line_error(r"corpus file .*c\.txt is not UTF-8 \(bad byte at offset 9003\)",
                  data_lib.load_token_data, data)
  (folder / "c.txt").write_text("")
  data.val_split = "train"
  data.train_split = "train[:0%]"  # an empty split (through TFDS's copy)
  _one_line_error(r"corpus is empty \(.* has no text\)", data_lib.load_token_data, data)


def test_a_dataset_without_a_text_feature_is_a_one_line_error(tmp_path):
  import tensorflow_datasets as tfds

  class JaxllmTestSentences(tfds.core.GeneratorBasedBuilder):
    """A catalog dataset (registered by defining it) whose feature is not called 'text'."""

    __module__ = "jaxllm.data.text_builder"  # TFDS wants a builder's module in a package
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return self.dataset_info_from_configs(
          features=tfds.features.FeaturesDict({"sentence": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(3):
        yield i, {"sentence": f"sentence {i}"}

  data = config_lib.default_config().data
  data.update(dict(dataset="jaxllm_test_sentences", data_dir=str(tmp_path)))
  _one_line_error(r"dataset 'jaxllm_test_sentences' has no 'text' feature \(it has: "
                  r"sentence\); pick a text dataset", data_lib.load_token_data, data)
