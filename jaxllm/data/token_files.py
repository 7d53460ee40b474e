"""Token files: each split is a list of flat shards of token ids, read through `np.memmap`.

A cache folder holds `index.json` ({"dtype": "uint16", "train": [{"file", "tokens"}, ...],
"val": [...]}), the shards `train-00000.bin`, ... (the ids as little-endian uint16, or uint32
for vocabularies past 65,536), `tokenizer.json` and `key.json`.

Why flat shards and not ArrayRecord: training reads windows of T + 1 consecutive tokens at
random offsets. In a flat file a window is a slice of a memory map, with no record to decode
and nothing loaded until a batch is gathered; a shard holds the same bytes as nanoGPT's
`train.bin` (`np.memmap(path, np.uint16)` reads it). Shards keep files to a size that file
systems and copy tools handle, and make preparation appendable: a shard is committed
(fsynced, then listed in `progress.json`) before the next begins, so a killed preparation
continues from its last committed shard.

Caches of jaxllm before shards (`train.npy` / `val.npy`) are still read.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import numpy as np

# Tokens per shard: 256 MB of uint16. A preparation killed midway redoes at most one shard.
SHARD_TOKENS = 1 << 27


class TokenShards:
  """The shards of one split as one read-only 1-D array of token ids (integer or slice
  indexing; `np.asarray` materialises it)."""

  ndim = 1

  def __init__(self, files: list[pathlib.Path], dtype: str | np.dtype):
    self.dtype = np.dtype(dtype).newbyteorder("<")
    self._maps = [np.memmap(f, self.dtype, mode="r") for f in files if f.stat().st_size]
    self._starts = np.cumsum([0] + [len(m) for m in self._maps])

  def __len__(self) -> int:
    return int(self._starts[-1])

  @property
  def shape(self) -> tuple[int]:
    return (len(self),)

  def __getitem__(self, index):
    if isinstance(index, slice):
      index = np.arange(*index.indices(len(self)))
    elif np.isscalar(index):
      return self[np.asarray([index])][0]
    index = np.asarray(index)
    if index.size and (index.min() < 0 or index.max() >= len(self)):
      raise IndexError(f"token index out of range [0, {len(self)})")
    if len(self._maps) == 1:
      return np.asarray(self._maps[0][index])
    shard = np.searchsorted(self._starts, index, side="right") - 1
    out = np.empty(index.shape, self.dtype)
    for s in np.unique(shard):
      where = shard == s
      out[where] = self._maps[s][index[where] - self._starts[s]]
    return out

  def __array__(self, dtype=None, copy=None):
    whole = np.concatenate(self._maps) if self._maps else np.zeros((0,), self.dtype)
    return whole if dtype is None else whole.astype(dtype)


def open_split(cache_dir: pathlib.Path, split: str) -> np.ndarray | TokenShards:
  """The tokens of `split` ("train" or "val") in a finished cache folder."""
  legacy = cache_dir / f"{split}.npy"
  if legacy.exists():
    return np.load(legacy, mmap_mode="r")
  index = json.loads((cache_dir / "index.json").read_text())
  return TokenShards([cache_dir / shard["file"] for shard in index[split]], index["dtype"])


def _write_json(path: pathlib.Path, value) -> None:
  """Replace `path` atomically and durably: a reader sees the old file or the new one."""
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "w") as f:
    json.dump(value, f, indent=1)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


class Preparation:
  """A cache being written, in `<cache>.partial/`. `progress.json` lists the committed shards
  of each split and how many characters of the split's text they hold; anything else found
  there (the shard a killed run was writing) is deleted, and a different key starts over."""

  def __init__(self, partial: pathlib.Path, key: dict):
    self.partial = partial
    progress = partial / "progress.json"
    state = json.loads(progress.read_text()) if progress.exists() else None
    if state is None or state.get("key") != key:
      shutil.rmtree(partial, ignore_errors=True)
      partial.mkdir(parents=True)
      state = {"key": key, "plan": None, "splits": {}}
    self.state = state
    listed = {s["file"] for split in state["splits"].values() for s in split["shards"]}
    for path in partial.iterdir():
      if path.name not in listed and path.name != "progress.json":
        path.unlink()

  @property
  def resumed(self) -> bool:
    return any(split["shards"] for split in self.state["splits"].values())

  def save(self) -> None:
    _write_json(self.partial / "progress.json", self.state)

  def split(self, name: str) -> dict:
    return self.state["splits"].setdefault(name, {"shards": [], "chars": 0, "done": False})

  def finish(self, cache_dir: pathlib.Path, dtype: np.dtype, tokenizer_json: dict) -> None:
    """Write the index and move the folder to `cache_dir` in one rename."""
    index = {"dtype": np.dtype(dtype).name,
             **{name: split["shards"] for name, split in self.state["splits"].items()}}
    _write_json(self.partial / "index.json", index)
    _write_json(self.partial / "tokenizer.json", tokenizer_json)
    _write_json(self.partial / "key.json", self.state["key"])
    (self.partial / "progress.json").unlink()
    os.rename(self.partial, cache_dir)


class ShardWriter:
  """Appends token ids to the shards of one split, committing a shard once it is full."""

  def __init__(self, preparation: Preparation, split: str, dtype: np.dtype,
               shard_tokens: int | None = None):
    self.preparation, self.name, self.dtype = preparation, split, np.dtype(dtype)
    self.split = preparation.split(split)
    self.shard_tokens = shard_tokens or SHARD_TOKENS
    self._file, self._tokens, self._chars = None, 0, 0

  @property
  def chars_done(self) -> int:
    """Characters of the split's text in committed shards: where a resumed run continues."""
    return self.split["chars"]

  def append(self, chars: int, ids: np.ndarray) -> None:
    """`ids`, the tokens of the split's next `chars` characters."""
    if self._file is None:
      name = f"{self.name}-{len(self.split['shards']):05d}.bin"
      self._file = open(self.preparation.partial / name, "wb")  # noqa: SIM115
    self._file.write(np.asarray(ids, self.dtype.newbyteorder("<")).tobytes())
    self._tokens += len(ids)
    self._chars += chars
    if self._tokens >= self.shard_tokens:
      self.commit()

  def commit(self) -> None:
    if self._file is None:
      return
    self._file.flush()
    os.fsync(self._file.fileno())
    self._file.close()
    self.split["shards"].append({"file": pathlib.Path(self._file.name).name,
                                 "tokens": self._tokens})
    self.split["chars"] += self._chars
    self.preparation.save()
    self._file, self._tokens, self._chars = None, 0, 0

  def finish(self) -> None:
    self.commit()
    self.split["done"] = True
    self.preparation.save()
