"""A corpus's text as a stream of pieces, in memory bounded by a block size, not by the corpus.

The text of splits "a+b" is every document of split a, then of split b, joined by
`data.separator`: the same string `"".join(pieces)` whatever the block size. Local text
(`data.dataset=text`) is read straight from its files in blocks of `READ_BYTES`, decoded
incrementally (a non-UTF-8 byte is an error naming the file and the byte's offset); the
local TFDS builder still names the corpus (its files, their order, their identity), but its
ArrayRecord copy is never written: TFDS's writer buffers up to 1 GB of examples in memory and
the copy would double the disk a large corpus takes. Catalog datasets are read from TFDS's
`as_data_source` in blocks of documents.

`CharRange` cuts the character range [start, stop) out of such a stream: the train and
validation texts of a `val_fraction` split, or the rest of a text after a resumed prefix.
"""

from __future__ import annotations

import codecs
import pathlib
from typing import Callable, Iterable, Iterator

import tensorflow_datasets as tfds

from jaxllm.errors import JaxllmError
from jaxllm.progress import progress_bar

READ_BYTES = 1 << 20  # bytes read from a local file at a time
DOCUMENT_BLOCK = 4096  # documents read from an ArrayRecord data source at a time


def split_names(spec: str) -> list[str]:
  """"train+validation" -> ["train", "validation"]."""
  names = [name.strip() for name in spec.split("+")]
  if not spec or not all(names):
    raise JaxllmError(f"bad split '{spec}' (splits are TFDS split names joined with '+', "
                      f"e.g. train+validation)")
  return names


def read_utf8(path: pathlib.Path, block_bytes: int = READ_BYTES) -> Iterator[str]:
  """The text of a UTF-8 file, a block at a time (bytes as they are: no newline translation)."""
  try:
    file = open(path, "rb")  # noqa: SIM115 (closed below, also when the reader stops early)
  except OSError as e:
    raise JaxllmError(f"cannot read corpus file {path} ({e.strerror}); fix its permissions or "
                      f"leave it out of data.path") from None
  decoder = codecs.getincrementaldecoder("utf-8")()
  offset = 0  # bytes of the file read before this block
  with file:
    while True:
      try:
        block = file.read(block_bytes)
      except OSError as e:
        raise JaxllmError(f"cannot read corpus file {path} at byte {offset} ({e.strerror}); "
                          f"check the disk or leave the file out of data.path") from None
      pending = len(decoder.getstate()[0])  # bytes of a character cut by the last block
      try:
        text = decoder.decode(block, final=not block)
      except UnicodeDecodeError as e:
        raise JaxllmError(f"corpus file {path} is not UTF-8 (bad byte at offset "
                          f"{offset - pending + e.start}); convert it (iconv -t utf-8) or leave "
                          f"it out of data.path") from None
      if text:
        yield text
      if not block:
        return
      offset += len(block)


class TextStream:
  """The joined text of some documents as pieces; counts the documents it has started."""

  def __init__(self, documents: Callable[[], Iterator[Iterator[str]]], separator: str):
    self._documents, self.separator = documents, separator
    self.documents = 0

  def __iter__(self) -> Iterator[str]:
    self.documents = 0
    for document in self._documents():
      if self.documents and self.separator:
        yield self.separator
      self.documents += 1
      yield from document


def local_stream(files: list[pathlib.Path], separator: str) -> TextStream:
  """Local files, one document each, in the given order."""
  return TextStream(lambda: (read_utf8(f) for f in files), separator)


def tfds_stream(builder: tfds.core.DatasetBuilder, spec: str, separator: str) -> TextStream:
  """The `text` of every example of the splits in `spec` of a prepared TFDS builder."""
  available = list(builder.info.splits.keys())
  if "text" not in builder.info.features:
    raise JaxllmError(f"dataset '{builder.name}' has no 'text' feature (it has: "
                      f"{', '.join(builder.info.features.keys())}); pick a text dataset")
  names = split_names(spec)
  for name in names:
    if name.split("[")[0] not in available:
      raise JaxllmError(f"dataset '{builder.name}' has no split '{name}' (it has: "
                        f"{', '.join(available)}); fix data.train_split / data.val_split")

  def documents() -> Iterator[Iterator[str]]:
    for name in names:
      if not builder.info.splits[name].num_examples:
        continue  # an empty split (e.g. "train[:0%]"): no documents, which TFDS cannot open
      source = builder.as_data_source(split=name)
      # In blocks: one ArrayRecord lookup per example is slow for millions of documents.
      for start in range(0, len(source), DOCUMENT_BLOCK):
        for example in source.__getitems__(range(start, min(start + DOCUMENT_BLOCK,
                                                             len(source)))):
          text = example["text"]
          yield iter((text.decode("utf-8") if isinstance(text, bytes) else text,))

  return TextStream(documents, separator)


class CharRange:
  """Characters [start, stop) of a stream (stop None: to its end), as pieces."""

  def __init__(self, stream: TextStream, start: int = 0, stop: int | None = None):
    self.stream, self.start, self.stop = stream, start, stop

  def __iter__(self) -> Iterator[str]:
    position = 0  # characters of the stream before `piece`
    for piece in self.stream:
      end = position + len(piece)
      if end > self.start:
        lo = max(self.start - position, 0)
        hi = len(piece) if self.stop is None else min(self.stop - position, len(piece))
        if hi > lo:
          yield piece[lo:hi] if (lo, hi) != (0, len(piece)) else piece
      position = end
      if self.stop is not None and position >= self.stop:
        return


def survey(stream: Iterable[str], on_piece: Callable[[str], None] | None = None,
           desc: str = "reading") -> tuple[int, bool]:
  """One pass over a stream: (its length in characters, whether any is not whitespace);
  `on_piece` sees every piece."""
  length, has_text = 0, False
  with progress_bar(desc=desc, unit="char", unit_scale=True, delay=2, dynamic_ncols=True) as bar:
    for piece in stream:
      length += len(piece)
      has_text = has_text or (bool(piece) and not piece.isspace())
      if on_piece is not None:
        on_piece(piece)
      bar.update(len(piece))
  return length, has_text
