"""Llama / Qwen2 / Mistral weights in and out, against transformers on random small models."""

from __future__ import annotations

import json
import re

import jax
import numpy as np
import pytest

from jaxllm import cli
from jaxllm.data import tokenizer as tokenizer_lib
from jaxllm.training import rundir as run_io

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 300  # the byte-level alphabet alone is 256 tokens


def _write_tokenizer(folder, shared_data):
  """A byte-level BPE tokenizer.json trained here on Tiny Shakespeare (the kind these models
  ship)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=VOCAB - 10, special_tokens=["<|endoftext|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train([str(shared_data / "tinyshakespeare.txt")], trainer)
  tok.save(str(folder / "tokenizer.json"))
  (folder / "tokenizer_config.json").write_text(json.dumps({
      "eos_token": "<|endoftext|>",
      "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                       "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>"
                       "assistant\n{% endif %}"}))
  return tok


def _model(kind: str):
  common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=64, rms_norm_eps=1e-6,
                tie_word_embeddings=False)
  if kind == "llama":  # grouped-query attention and Llama 3's rotary scaling
    config = transformers.LlamaConfig(**common, num_key_value_heads=2, rope_parameters={
        "rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    model = transformers.LlamaForCausalLM(config)
  elif kind == "qwen2":  # q/k/v biases, tied embeddings, multi-query attention
    config = transformers.Qwen2Config(**{**common, "tie_word_embeddings": True},
                                      num_key_value_heads=1)
    model = transformers.Qwen2ForCausalLM(config)
  else:  # no grouping: jaxllm's fused qkv layout
    config = transformers.MistralConfig(**common, num_key_value_heads=4, sliding_window=None)
    model = transformers.MistralForCausalLM(config)
  torch.manual_seed(0)
  with torch.no_grad():  # random everything, norms and biases too
    for param in model.parameters():
      param.copy_(0.2 * torch.randn_like(param))
  return model.eval()


def _logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_weights_in_and_out_match_transformers(kind, tmp_path, shared_data):
  folder = tmp_path / "hf"
  hf_model = _model(kind)
  hf_model.save_pretrained(folder)
  tok = _write_tokenizer(folder, shared_data)
  tokens = np.random.default_rng(0).integers(0, VOCAB, size=(2, 24))
  expected = _logits(hf_model, tokens)

  assert cli.main(["convert", "--from", str(folder), "--out", str(tmp_path / "run")]) == 0
  _, model, params, tokenizer = run_io.load_run(tmp_path / "run")
  cfg = model.config
  assert (cfg.norm, cfg.position, cfg.mlp, cfg.qkv_bias) == (
      "rmsnorm", "rope", "swiglu", kind == "qwen2")
  assert cfg.kv_heads == {"llama": 2, "qwen2": 1, "mistral": 4}[kind]
  ours = np.asarray(jax.jit(model.apply)({"params": params}, tokens))
  np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)
  assert np.abs(expected).max() > 0.5  # the comparison is not of near-zeros (tolerance 1e-4)

  # The tokenizer came along: the same ids as the tokenizers library, and end-of-text.
  if kind == "llama":
    text = (shared_data / "tinyshakespeare.txt").read_text(encoding="utf-8")
    ids = tokenizer.encode(text)
    assert ids == tok.encode(text, add_special_tokens=False).ids and len(ids) > 200_000
    assert tokenizer.decode(ids) == text == tok.decode(ids)
  assert tokenizer.encode("a" + tokenizer_lib.EOT)[-1] == tok.token_to_id("<|endoftext|>")
  # tokenizer_config.json (the chat template `jaxllm serve` renders) is kept, and goes back out.
  settings = (folder / "tokenizer_config.json").read_text()
  assert (tmp_path / "run" / "tokenizer_config.json").read_text() == settings

  assert cli.main(["convert", "--to", "hf", "--from", str(tmp_path / "run"),
                   "--out", str(tmp_path / "back")]) == 0
  assert (tmp_path / "back" / "tokenizer_config.json").read_text() == settings
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
  np.testing.assert_allclose(_logits(reloaded, tokens), expected, atol=1e-4, rtol=0)


def test_sharded_checkpoint_with_an_index(tmp_path, shared_data):
  folder = tmp_path / "hf"
  hf_model = _model("llama")
  hf_model.save_pretrained(folder, max_shard_size="100KB")
  assert (folder / "model.safetensors.index.json").is_file()
  _write_tokenizer(folder, shared_data)
  assert cli.main(["convert", "--from", str(folder), "--out", str(tmp_path / "run")]) == 0
  _, model, params, _ = run_io.load_run(tmp_path / "run")
  tokens = np.arange(20)[None] % VOCAB
  np.testing.assert_allclose(np.asarray(model.apply({"params": params}, tokens)),
                             _logits(hf_model, tokens), atol=1e-4, rtol=0)


def test_a_converted_llama_generates_and_trains_like_a_gpt2_run(tmp_path, shared_data, capsys):
  folder = tmp_path / "hf"
  _model("llama").save_pretrained(folder)
  _write_tokenizer(folder, shared_data)
  run = tmp_path / "run"
  assert cli.main(["convert", "--from", str(folder), "--out", str(run)]) == 0
  capsys.readouterr()
  # Greedy generation = the argmax of the model's logits, step after step.
  assert cli.main(["generate", "--workdir", str(run), "--prompt", "I had always",
                   "--max-new-tokens", "3", "--temperature", "0"]) == 0
  printed = capsys.readouterr().out
  _, model, params, tokenizer = run_io.load_run(run)
  ids = tokenizer.encode("I had always")
  prompt_length = len(ids)
  for _ in range(3):  # ids past the tokenizer's 290 (the model has 300) are never generated
    logits_V = np.asarray(model.apply({"params": params}, np.array([ids])))[0, -1]
    ids.append(int(np.argmax(logits_V[:tokenizer.vocab_size])))
  # The prompt, then the new tokens decoded (random weights: perhaps bytes of no character).
  assert printed == "I had always" + tokenizer.decode(ids[prompt_length:]) + "\n"
  # Perplexity of a text, with its tokenizer.
  verdict = shared_data / "the-verdict.txt"
  assert cli.main(["eval", "--workdir", str(run), "--text", str(verdict), "--no-progress"]) == 0
  count = len(tokenizer.encode(verdict.read_text(encoding="utf-8")))
  scored = int(re.search(r": ([\d,]+) tokens, loss \d", capsys.readouterr().out).group(1)
               .replace(",", ""))
  assert count - 64 <= scored < count  # whole windows of the context (64) predicted
  # Pretraining goes on from it, with its tokenizer, on the mesh and trainer of every run.
  assert cli.main(["train", "--config", "experiments/shakespeare_char.py",
                   "--workdir", str(tmp_path / "more"), "--config.train.init_from", str(run),
                   "--config.data.dataset=text", "--config.data.train_split=train",
                   f"--config.data.path={shared_data / 'the-verdict.txt'}",
                   "--config.data.data_dir", str(tmp_path / "tfds"),
                   "--config.train.steps=4", "--config.train.batch_size=4",
                   "--config.train.eval_every=4", "--config.train.eval_batches=2",
                   "--config.train.sample_tokens=4",
                   "--config.checkpoint.every_steps=0", "--config.train.peak_flops=1e9"]) == 0
  figures = json.loads((tmp_path / "more" / "eval.json").read_text())
  assert figures["val_loss"] < figures["initial_val_loss"]
  assert json.loads((tmp_path / "more" / "tokenizer.json").read_text())["kind"] == "hf"


def test_cached_greedy_decoding_equals_transformers_generate(tmp_path, shared_data):
  from jaxllm.serve import generate as generate_lib

  folder = tmp_path / "hf"
  hf_model = _model("llama")
  hf_model.save_pretrained(folder)
  _write_tokenizer(folder, shared_data)
  assert cli.main(["convert", "--from", str(folder), "--out", str(tmp_path / "run")]) == 0
  _, model, params, _ = run_io.load_run(tmp_path / "run")
  rng = np.random.default_rng(3)
  prompts = [rng.integers(1, VOCAB, 5).tolist(), rng.integers(1, VOCAB, 11).tolist()]
  ours = generate_lib.generate(model, params, prompts, max_new_tokens=32, temperature=0.0)
  # transformers: prompts left-padded, positions counted from each row's first real token.
  padded = torch.tensor([[0] * 6 + prompts[0], prompts[1]])
  mask = torch.tensor([[0] * 6 + [1] * 5, [1] * 11])
  with torch.no_grad():
    out = hf_model.generate(padded, attention_mask=mask, max_new_tokens=32, do_sample=False,
                            eos_token_id=None, pad_token_id=0)
  theirs = out[:, 11:].tolist()
  assert [len(row) for row in ours] == [32, 32]
  assert ours == theirs


@pytest.fixture(scope="module")
def qwen2_folder(tmp_path_factory):
  """A saved random Qwen2 (q/k/v biases, tied embeddings) with a small BPE tokenizer.json."""
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers

  folder = tmp_path_factory.mktemp("qwen2")
  _model("qwen2").save_pretrained(folder)
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.train_from_iterator(["to be or not to be"], trainers.BpeTrainer(
      vocab_size=270, special_tokens=["<|endoftext|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.save(str(folder / "tokenizer.json"))
  return folder


def _broken_copy(folder, tmp_path, change_tensors=None, change_config=None):
  """A copy of `folder` with its tensors and config.json passed through the changes."""
  import shutil

  from safetensors.numpy import load_file, save_file

  copy = tmp_path / "hf"
  shutil.copytree(folder, copy)
  if change_tensors:
    tensors = change_tensors(load_file(copy / "model.safetensors"))
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
  if change_config:
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(change_config(config)))
  return copy


def _convert_error(folder, tmp_path):
  from jaxllm.errors import JaxllmError
  from jaxllm.weights import llama as llama_weights

  with pytest.raises(JaxllmError) as error:
    llama_weights.import_llama(folder, tmp_path / "run")
  return str(error.value)


def _without(*names):
  return lambda tensors: {k: v for k, v in tensors.items() if k not in names}


def test_a_missing_tensor_is_named_with_its_file(qwen2_folder, tmp_path):
  folder = _broken_copy(qwen2_folder, tmp_path, _without("model.layers.1.mlp.up_proj.weight"))
  message = _convert_error(folder, tmp_path)
  assert message.startswith(f"{folder} lacks 'layers.1.mlp.up_proj.weight'"), message
  assert "config.json" in message


def test_a_missing_bias_is_named(qwen2_folder, tmp_path):
  folder = _broken_copy(qwen2_folder, tmp_path, _without("model.layers.0.self_attn.k_proj.bias"))
  assert f"{folder} lacks 'layers.0.self_attn.k_proj.bias'" in _convert_error(folder, tmp_path)


def test_unexpected_tensors_are_named_but_rotary_buffers_pass(qwen2_folder, tmp_path):
  def add(extra):
    return lambda tensors: {**tensors, **extra}

  inv_freq = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)
              for i in range(2)}
  folder = _broken_copy(qwen2_folder, tmp_path / "a", add(inv_freq))
  assert cli.main(["convert", "--from", str(folder), "--out", str(tmp_path / "run")]) == 0

  extra = {f"model.layers.{i}.self_attn.q_norm.weight": np.ones(16, np.float32)
           for i in range(2)}
  extra.update({"score.weight": np.ones((2, 64), np.float32),
                "model.layers.0.mlp.gate_proj.bias": np.ones(96, np.float32)})
  folder = _broken_copy(qwen2_folder, tmp_path / "b", add({**inv_freq, **extra}))
  assert (f"{folder} holds 4 tensors that a Llama-family model has not "
          f"('layers.0.mlp.gate_proj.bias', 'layers.0.self_attn.q_norm.weight', "
          f"'layers.1.self_attn.q_norm.weight' and 1 more)") in _convert_error(folder, tmp_path)


def test_a_tied_head_that_differs_from_the_embeddings_is_refused(qwen2_folder, tmp_path):
  def untied(tensors):
    return {**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"] + 1.0}

  folder = _broken_copy(qwen2_folder, tmp_path, untied)
  assert "lm_head.weight differs from embed_tokens.weight" in _convert_error(folder, tmp_path)


def test_a_truncated_checkpoint_and_a_missing_config_key(qwen2_folder, tmp_path):
  folder = _broken_copy(qwen2_folder, tmp_path / "a")
  data = (folder / "model.safetensors").read_bytes()
  (folder / "model.safetensors").write_bytes(data[:len(data) // 2])
  message = _convert_error(folder, tmp_path)
  assert message.startswith(f"{folder / 'model.safetensors'} cannot be read"), message
  assert "download it again" in message

  def no_hidden_size(config):
    return {k: v for k, v in config.items() if k != "hidden_size"}

  folder = _broken_copy(qwen2_folder, tmp_path / "b", change_config=no_hidden_size)
  assert f"{folder / 'config.json'} lacks 'hidden_size'" in _convert_error(folder, tmp_path)


def test_a_broken_shard_index_or_tokenizer_is_named(qwen2_folder, tmp_path):
  folder = _broken_copy(qwen2_folder, tmp_path / "a")
  (folder / "model.safetensors.index.json").write_text('{"weight_map": {"x": "model-0')
  assert f"{folder / 'model.safetensors.index.json'} is not valid JSON" in _convert_error(
      folder, tmp_path)
  (folder / "model.safetensors.index.json").write_text(
      json.dumps({"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
  assert "model-00002-of-00002.safetensors, which is not there" in _convert_error(
      folder, tmp_path)

  folder = _broken_copy(qwen2_folder, tmp_path / "b")
  text = (folder / "tokenizer.json").read_text()
  (folder / "tokenizer.json").write_text(text[:len(text) // 2])
  message = _convert_error(folder, tmp_path)
  assert message.startswith(f"{folder / 'tokenizer.json'} is not a Hugging Face "
                            f"tokenizer.json"), message


CONVERSATIONS = [
    [{"role": "user", "content": "to be or not to be"}],
    [{"role": "system", "content": "You answer in verse."},
     {"role": "user", "content": "What is the question?"}],
    [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there."},
     {"role": "user", "content": "Say it again, twice."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "One"},
     {"role": "assistant", "content": "Two"}, {"role": "user", "content": "Three?"}],
    [{"role": "user", "content": "Ünïcödé, tabs\tand\nnewlines — fine?"}],
]


def test_a_converted_models_chat_template_gives_transformers_prompt_ids(qwen2_folder, tmp_path):
  """`jaxllm serve` renders chat requests with the tokenizer_config.json convert kept: the
  prompt ids of five conversations equal transformers' apply_chat_template."""
  from jaxllm.serve import chat

  folder = tmp_path / "qwen2"
  folder.mkdir()
  for path in qwen2_folder.iterdir():
    (folder / path.name).write_bytes(path.read_bytes())
  template = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>"
              "system\nYou are helpful.<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n"
              "{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}"
              "<|im_start|>assistant\n{% endif %}")
  (folder / "tokenizer_config.json").write_text(json.dumps({
      "eos_token": "<|endoftext|>", "chat_template": template}))
  assert cli.main(["convert", "--from", str(folder), "--out", str(tmp_path / "run")]) == 0
  config, _, _, tokenizer = run_io.load_run(tmp_path / "run")
  render = chat.chat_template_for(tmp_path / "run", config)
  theirs = transformers.AutoTokenizer.from_pretrained(folder)
  for messages in CONVERSATIONS:
    expected = list(theirs.apply_chat_template(messages, add_generation_prompt=True,
                                               tokenize=True, return_dict=True)["input_ids"])
    assert tokenizer.encode(render(messages)) == expected
    assert len(expected) > 10
