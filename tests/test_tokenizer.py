import numpy as np
import pytest

from jaxllm import tokenizer as tokenizer_lib
from jaxllm.errors import JaxllmError


def test_gpt2_ids_and_round_trip():
  tok = tokenizer_lib.get_tokenizer("gpt2")
  assert tok.encode("Hello, world!") == [15496, 11, 995, 0]
  assert (tok.vocab_size, tok.eot_id) == (50257, 50256)
  text = "Every effort moves you, said the painter.\n  Tabs\tand ünïcödé — too."
  assert tok.decode(tok.encode(text)) == text


def test_gpt2_endoftext_is_one_special_token():
  tok = tokenizer_lib.get_tokenizer("gpt2")
  assert tok.encode("a<|endoftext|>b") == [64, 50256, 65]
  assert tok.decode([64, 50256, 65]) == "a<|endoftext|>b"


def test_other_tiktoken_encodings_by_name():
  tok = tokenizer_lib.get_tokenizer("r50k_base")  # the same BPE as gpt2, under its own name
  assert tok.encode("Hello, world!") == [15496, 11, 995, 0]


def test_unknown_encoding_is_a_user_error():
  with pytest.raises(JaxllmError, match="unknown tokenizer 'gpt9'"):
    tokenizer_lib.get_tokenizer("gpt9")


def test_char_tokenizer_from_corpus():
  tok = tokenizer_lib.get_tokenizer("char", corpus="hello world")
  assert tok.chars == " dehlorw"
  assert (tok.vocab_size, tok.eot_id) == (9, 8)
  assert tok.encode("hold<|endoftext|>we") == [3, 5, 4, 1, 8, 7, 2]
  assert tok.decode(tok.encode("hello<|endoftext|>world")) == "hello<|endoftext|>world"
  with pytest.raises(JaxllmError, match="'z' is not in the character vocabulary"):
    tok.encode("zoo")


def test_json_round_trip():
  for tok in (tokenizer_lib.get_tokenizer("char", corpus="abc"),
              tokenizer_lib.get_tokenizer("gpt2")):
    again = tokenizer_lib.from_json(tok.to_json())
    assert again.encode("cab") == tok.encode("cab")
    assert again.vocab_size == tok.vocab_size


def test_encode_array_equals_encode(shared_data):
  text = (shared_data / "the-verdict.txt").read_text(encoding="utf-8")[:4000]
  text = text + tokenizer_lib.EOT + text[:300] + tokenizer_lib.EOT
  for tok in (tokenizer_lib.TiktokenTokenizer("gpt2"),
              tokenizer_lib.CharTokenizer.from_corpus(text)):
    ids = tok.encode_array(text)
    assert ids.dtype.kind in "iu"
    np.testing.assert_array_equal(ids, tok.encode(text))
  with pytest.raises(JaxllmError, match="character 'é' is not in the character vocabulary"):
    tokenizer_lib.CharTokenizer("abc").encode_array("abé")
