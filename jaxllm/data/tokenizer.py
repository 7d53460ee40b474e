"""Tokenizers behind one interface: tiktoken BPE encodings (GPT-2's by default), characters,
Hugging Face tokenizer.json files and BERT's WordPiece vocabularies.

Both know `<|endoftext|>`: tiktoken as its special token, the character tokenizer as one
extra id after the characters of its corpus.
"""

from __future__ import annotations

import json
import pathlib
from typing import Sequence

import numpy as np

from jaxllm.errors import JaxllmError

EOT = "<|endoftext|>"


class Tokenizer:
  """encode(text) -> ids, decode(ids) -> text; `vocab_size` and `eot_id` for the model."""

  name: str
  vocab_size: int
  eot_id: int

  def encode(self, text: str) -> list[int]:
    raise NotImplementedError

  def encode_array(self, text: str) -> np.ndarray:
    """`encode(text)` as an integer array, without a Python list where the tokenizer can (and
    without holding the GIL where it can, so threads encode in parallel)."""
    return np.asarray(self.encode(text), np.int64)

  def decode(self, ids: Sequence[int]) -> str:
    raise NotImplementedError

  def to_json(self) -> dict:
    """What `from_json` needs to rebuild this tokenizer (stored with a run)."""
    raise NotImplementedError

  @property
  def pad_id(self) -> int:
    """What padding fills with: the end-of-text id, unless the vocabulary has a [PAD]."""
    return self.eot_id


class TiktokenTokenizer(Tokenizer):
  """Any tiktoken encoding by name. `<|endoftext|>` in the text becomes the EOT id."""

  def __init__(self, name: str = "gpt2"):
    import tiktoken  # deferred: it reads its BPE files (TIKTOKEN_CACHE_DIR) on first use

    try:
      self._encoding = tiktoken.get_encoding(name)
    except ValueError as e:
      raise JaxllmError(f"unknown tokenizer '{name}' (data.tokenizer takes 'char' or a "
                        f"tiktoken encoding such as gpt2, r50k_base, cl100k_base)") from e
    except Exception as e:  # network / cache failures surface as requests or OS errors
      raise JaxllmError(f"could not load tiktoken encoding '{name}': {e} (on an offline "
                        f"machine, point TIKTOKEN_CACHE_DIR at a folder holding its files)") from e
    self.name = name
    self.vocab_size = self._encoding.n_vocab
    self.eot_id = self._encoding.eot_token

  def encode(self, text: str) -> list[int]:
    return self._encoding.encode(text, allowed_special={EOT})

  def encode_array(self, text: str) -> np.ndarray:
    return self._encoding.encode_to_numpy(text, allowed_special={EOT})

  def decode(self, ids: Sequence[int]) -> str:
    return self._encoding.decode([int(i) for i in ids])

  def to_json(self) -> dict:
    return {"kind": "tiktoken", "name": self.name}


class CharTokenizer(Tokenizer):
  """One id per distinct character of a corpus (sorted), plus `<|endoftext|>` last."""

  name = "char"

  def __init__(self, chars: str):
    self.chars = "".join(sorted(set(chars)))
    self._ids = {c: i for i, c in enumerate(self.chars)}
    self.eot_id = len(self.chars)
    self.vocab_size = len(self.chars) + 1
    # encode_array's lookup from code point to id (-1: not in the vocabulary).
    codes = [ord(c) for c in self.chars]
    self._table = np.full(max(codes, default=0) + 2, -1, np.int32)
    self._table[codes] = np.arange(len(codes))

  @classmethod
  def from_corpus(cls, text: str) -> "CharTokenizer":
    return cls(text.replace(EOT, ""))

  def encode(self, text: str) -> list[int]:
    ids = []
    for i, piece in enumerate(text.split(EOT)):
      if i:
        ids.append(self.eot_id)
      try:
        ids.extend(self._ids[c] for c in piece)
      except KeyError as e:
        raise JaxllmError(f"character {e.args[0]!r} is not in the character vocabulary "
                          f"(it was built from a corpus without it)") from None
    return ids

  def encode_array(self, text: str) -> np.ndarray:
    pieces = []
    for i, piece in enumerate(text.split(EOT)):
      if i:
        pieces.append(np.array([self.eot_id], np.int32))
      points = np.frombuffer(piece.encode("utf-32-le"), np.uint32)
      ids = self._table[np.minimum(points, len(self._table) - 1)]
      unknown = np.flatnonzero(ids < 0)
      if len(unknown):
        raise JaxllmError(f"character {chr(points[unknown[0]])!r} is not in the character "
                          f"vocabulary (it was built from a corpus without it)")
      pieces.append(ids)
    return np.concatenate(pieces)

  def decode(self, ids: Sequence[int]) -> str:
    return "".join(EOT if i == self.eot_id else self.chars[i] for i in map(int, ids))

  def to_json(self) -> dict:
    return {"kind": "char", "chars": self.chars}


def _parse(spec: str, source: str):
  """The `tokenizers` Tokenizer of a tokenizer.json's text; a malformed one is a user error."""
  from tokenizers import Tokenizer as HfTokenizer  # deferred: the hf extra brings it

  try:
    return HfTokenizer.from_str(spec)
  except Exception as e:  # tokenizers raises bare Exceptions ("EOF while parsing ...")
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise JaxllmError(f"{source} is not a Hugging Face tokenizer.json ({reason}); copy it again "
                      f"from the model's repository") from None


class HFTokenizer(Tokenizer):
  """A Hugging Face `tokenizer.json` (Llama, Qwen, Mistral, ...) through the `tokenizers`
  library. Text is encoded without the special tokens a template would add (no BOS);
  `<|endoftext|>` in the text becomes the end-of-text token `eot` (the model's eos)."""

  name = "hf"
  EOT_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<|im_end|>", "<eos>")

  def __init__(self, spec: str, eot: str | None = None, source: str = "tokenizer.json"):
    self._spec = spec
    self._tokenizer = _parse(spec, source)
    self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
    vocab = self._tokenizer.get_vocab(with_added_tokens=True)
    self.eot = eot or next((t for t in self.EOT_CANDIDATES if t in vocab), None)
    if self.eot not in vocab:
      raise JaxllmError(f"the tokenizer has no end-of-text token ({self.eot or 'none of '}"
                        f"{'' if self.eot else ', '.join(self.EOT_CANDIDATES)}); name it in "
                        f"the model folder's tokenizer_config.json as eos_token")
    self.eot_id = vocab[self.eot]

  @classmethod
  def from_file(cls, path: str) -> "HFTokenizer":
    try:
      text = pathlib.Path(path).read_text(encoding="utf-8")
    except OSError as e:
      raise JaxllmError(f"cannot read tokenizer file {path} ({e.strerror}); data.tokenizer "
                        f"takes a tiktoken name, char, or a Hugging Face tokenizer.json") from None
    return cls(text, source=path)

  def encode(self, text: str) -> list[int]:
    ids: list[int] = []
    for i, piece in enumerate(text.split(EOT)):
      if i:
        ids.append(self.eot_id)
      if piece:
        ids.extend(self._tokenizer.encode(piece, add_special_tokens=False).ids)
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

  def to_json(self) -> dict:
    return {"kind": "hf", "eot": self.eot, "tokenizer": json.loads(self._spec)}


class WordPieceTokenizer(Tokenizer):
  """BERT's WordPiece vocabulary (a `vocab.txt`, or a `tokenizer.json` whose model is
  WordPiece) through the `tokenizers` library, with its special tokens: `encode` gives the
  word pieces alone; `encode_for_model` adds [CLS] ... [SEP] (and a second segment after the
  first [SEP]) with the segment ids. [SEP] serves as the end-of-text id."""

  name = "wordpiece"
  SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

  def __init__(self, spec: str, source: str = "tokenizer.json"):
    self._spec = spec
    self._tokenizer = _parse(spec, source)
    vocab = self._tokenizer.get_vocab(with_added_tokens=True)
    missing = [t for t in self.SPECIALS if t not in vocab]
    if missing:
      raise JaxllmError(f"the WordPiece vocabulary lacks {', '.join(missing)} (BERT's "
                        f"special tokens {', '.join(self.SPECIALS)} must all be in it)")
    self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
    self._pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
        vocab[t] for t in self.SPECIALS)
    self.eot_id = self.sep_id
    if self._tokenizer.post_processor is None:  # a tokenizer.json saved without BERT's template
      from tokenizers.processors import BertProcessing
      self._tokenizer.post_processor = BertProcessing(("[SEP]", self.sep_id),
                                                      ("[CLS]", self.cls_id))

  @property
  def pad_id(self) -> int:
    return self._pad_id

  @classmethod
  def from_path(cls, path: str | pathlib.Path, lowercase: bool | None = None
                ) -> "WordPieceTokenizer":
    """A folder holding tokenizer.json or vocab.txt (a BERT checkpoint's), or either file.
    For a vocab.txt, `lowercase` (default: tokenizer_config.json's do_lower_case, else True)."""
    path = pathlib.Path(path)
    if path.is_dir():
      found = [path / f for f in ("tokenizer.json", "vocab.txt") if (path / f).is_file()]
      if not found:
        raise JaxllmError(f"{path} holds neither tokenizer.json nor vocab.txt (a BERT "
                          f"tokenizer needs one of them)")
      path = found[0]
    if not path.is_file():
      raise JaxllmError(f"tokenizer file {path} not found (a BERT tokenizer is a "
                        f"tokenizer.json or a vocab.txt)")
    if path.suffix == ".json":
      return cls(path.read_text(encoding="utf-8"), source=str(path))
    from tokenizers import BertWordPieceTokenizer

    words = set(path.read_text(encoding="utf-8").splitlines())
    missing = [t for t in cls.SPECIALS if t not in words]
    if missing:
      raise JaxllmError(f"{path} lacks {', '.join(missing)} (BERT's special tokens "
                        f"{', '.join(cls.SPECIALS)} must all be in the vocabulary)")
    if lowercase is None:
      settings = path.parent / "tokenizer_config.json"
      lowercase = _settings(settings).get("do_lower_case", True) if settings.is_file() else True
    return cls(BertWordPieceTokenizer(str(path), lowercase=lowercase).to_str())

  def encode(self, text: str) -> list[int]:
    return self._tokenizer.encode(text, add_special_tokens=False).ids

  def encode_for_model(self, text: str, pair: str | None = None
                       ) -> tuple[list[int], list[int]]:
    """(ids with [CLS] text [SEP] (pair [SEP]), segment ids 0 ... 0 (1 ... 1))."""
    encoding = self._tokenizer.encode(text, pair, add_special_tokens=True)
    return encoding.ids, encoding.type_ids

  def decode(self, ids: Sequence[int]) -> str:
    return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

  def to_json(self) -> dict:
    return {"kind": "wordpiece", "tokenizer": json.loads(self._spec)}


def _settings(path: pathlib.Path) -> dict:
  """A tokenizer_config.json's settings; a malformed file is a one-line error naming it."""
  try:
    settings = json.loads(path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise JaxllmError(f"{path} is not valid JSON ({e}); copy it again from the model's "
                      f"folder") from None
  if not isinstance(settings, dict):
    raise JaxllmError(f"{path} holds a {type(settings).__name__}, not the settings object "
                      f"tokenizer_config.json is")
  return settings


def _is_wordpiece_json(path: str) -> bool:
  try:
    spec = json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
  except (OSError, json.JSONDecodeError):
    return False
  return (spec.get("model") or {}).get("type") == "WordPiece"


def get_tokenizer(name: str, corpus: str | None = None) -> Tokenizer:
  """`"char"` (built from `corpus`), a Hugging Face tokenizer.json path (WordPiece ones as
  BERT's), a BERT vocab.txt, or a tiktoken encoding name."""
  if name.endswith("vocab.txt") or (name.endswith(".json") and _is_wordpiece_json(name)):
    return WordPieceTokenizer.from_path(name)
  if name.endswith(".json"):
    return HFTokenizer.from_file(name)
  if name == "char":
    if corpus is None:
      raise JaxllmError("the char tokenizer is built from a corpus; none was given")
    return CharTokenizer.from_corpus(corpus)
  return TiktokenTokenizer(name)


def from_json(spec: dict) -> Tokenizer:
  if spec.get("kind") == "char":
    return CharTokenizer(spec["chars"])
  if spec.get("kind") == "tiktoken":
    return TiktokenTokenizer(spec["name"])
  if spec.get("kind") == "hf":
    return HFTokenizer(json.dumps(spec["tokenizer"]), spec.get("eot"))
  if spec.get("kind") == "wordpiece":
    return WordPieceTokenizer(json.dumps(spec["tokenizer"]))
  raise JaxllmError(f"unrecognised tokenizer description {json.dumps(spec)[:80]}")
