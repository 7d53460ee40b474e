import numpy as np
import pytest

from jaxllm.data import tokenizer as tokenizer_lib
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


@pytest.fixture(scope="module")
def wordpiece_folder(tmp_path_factory, shared_data):
  """A WordPiece vocabulary trained here with `tokenizers` on Tiny Shakespeare, saved both
  ways a BERT checkpoint ships it (vocab.txt and tokenizer.json)."""
  tokenizers = pytest.importorskip("tokenizers")
  folder = tmp_path_factory.mktemp("wordpiece")
  trainer = tokenizers.BertWordPieceTokenizer(lowercase=True)
  text = (shared_data / "tinyshakespeare.txt").read_text()[:200_000]
  trainer.train_from_iterator(text.splitlines(), vocab_size=400,
                              special_tokens=list(tokenizer_lib.WordPieceTokenizer.SPECIALS))
  trainer.save_model(str(folder))  # vocab.txt
  trainer.save(str(folder / "tokenizer.json"))
  return folder


def test_wordpiece_from_vocab_txt_and_tokenizer_json_agree_with_transformers(wordpiece_folder):
  transformers = pytest.importorskip("transformers")
  from_txt = tokenizer_lib.get_tokenizer(str(wordpiece_folder / "vocab.txt"))
  from_json = tokenizer_lib.get_tokenizer(str(wordpiece_folder / "tokenizer.json"))
  assert isinstance(from_json, tokenizer_lib.WordPieceTokenizer)
  text, pair = "To be, or not to be: that is the question.", "Whether 'tis nobler"
  ids, types = from_txt.encode_for_model(text, pair)
  assert (ids, types) == from_json.encode_for_model(text, pair)
  words = (wordpiece_folder / "vocab.txt").read_text().splitlines()
  reference = transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})
  expected = reference(text, pair)
  assert ids == expected["input_ids"] and types == expected["token_type_ids"]
  assert ids[0] == from_txt.cls_id and ids.count(from_txt.sep_id) == 2
  first_sep = ids.index(from_txt.sep_id)
  assert types == [0] * (first_sep + 1) + [1] * (len(ids) - first_sep - 1)
  assert from_txt.encode(text) == ids[1:ids.index(from_txt.sep_id)]  # no specials
  assert from_txt.decode(from_txt.encode(text)) == "to be, or not to be : that is the question."
  assert [from_txt.pad_id, from_txt.unk_id, from_txt.cls_id, from_txt.sep_id,
          from_txt.mask_id] == [0, 1, 2, 3, 4]
  assert from_txt.vocab_size == 400
  again = tokenizer_lib.from_json(from_txt.to_json())  # stored with a run
  assert again.encode_for_model(text, pair) == (ids, types)


def test_wordpiece_errors_name_the_files(tmp_path, wordpiece_folder):
  with pytest.raises(JaxllmError, match="holds neither tokenizer.json nor vocab.txt"):
    tokenizer_lib.WordPieceTokenizer.from_path(tmp_path)
  with pytest.raises(JaxllmError, match="tokenizer file .*vocab.txt not found"):
    tokenizer_lib.get_tokenizer(str(tmp_path / "vocab.txt"))
  (tmp_path / "vocab.txt").write_text("a\nb\n[PAD]\n")
  with pytest.raises(JaxllmError, match=r"lacks \[UNK\], \[CLS\], \[SEP\], \[MASK\]"):
    tokenizer_lib.get_tokenizer(str(tmp_path / "vocab.txt"))


def test_a_malformed_tokenizer_json_names_the_file(tmp_path, wordpiece_folder):
  text = (wordpiece_folder / "tokenizer.json").read_text()
  cut = tmp_path / "cut" / "tokenizer.json"
  cut.parent.mkdir()
  cut.write_text(text[:len(text) // 2])
  with pytest.raises(JaxllmError, match=f"^{cut} is not a Hugging Face tokenizer.json "
                                        r"\(EOF while parsing .*\); copy it again"):
    tokenizer_lib.get_tokenizer(str(cut))
  with pytest.raises(JaxllmError, match=f"^{cut} is not a Hugging Face tokenizer.json"):
    tokenizer_lib.WordPieceTokenizer.from_path(cut.parent)  # a BERT folder
  stub = tmp_path / "stub.json"
  stub.write_text('{"model": {"type": "WordPiece"}}')  # JSON, but no tokenizer
  with pytest.raises(JaxllmError, match=f"^{stub} is not a Hugging Face tokenizer.json"):
    tokenizer_lib.get_tokenizer(str(stub))


def test_a_malformed_tokenizer_config_names_the_file(tmp_path, wordpiece_folder):
  folder = tmp_path / "bert"
  folder.mkdir()
  (folder / "vocab.txt").write_text((wordpiece_folder / "vocab.txt").read_text())
  (folder / "tokenizer_config.json").write_text('{"do_lower_case": tru')
  with pytest.raises(JaxllmError, match=f"^{folder / 'tokenizer_config.json'} is not valid "
                                        r"JSON \(.*\); copy it again"):
    tokenizer_lib.WordPieceTokenizer.from_path(folder / "vocab.txt")
  (folder / "tokenizer_config.json").write_text('["do_lower_case"]')
  with pytest.raises(JaxllmError, match="holds a list, not the settings object"):
    tokenizer_lib.WordPieceTokenizer.from_path(folder / "vocab.txt")
  (folder / "tokenizer_config.json").write_text('{"do_lower_case": false}')
  assert tokenizer_lib.WordPieceTokenizer.from_path(folder / "vocab.txt").encode("ROMEO") != (
      tokenizer_lib.WordPieceTokenizer.from_path(folder / "vocab.txt", lowercase=True).encode(
          "ROMEO"))
