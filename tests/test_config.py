import re

import jax
import ml_collections
import pytest

from jaxllm import config as config_lib
from jaxllm.errors import JaxllmError


def test_overrides_parse_by_type():
  config = config_lib.default_config()
  config_lib.apply_overrides(config, [
      "model.n_layer=6", "train.learning_rate=3e-4", "model.tie_embeddings=false",
      "data.path=corpus.txt", "train.sample_prompt=\\nROMEO:", "model.preset=gpt2-small"])
  assert config.model.n_layer == 6 and isinstance(config.model.n_layer, int)
  assert config.train.learning_rate == 3e-4
  assert config.model.tie_embeddings is False
  assert config.data.path == "corpus.txt"
  assert config.train.sample_prompt == "\nROMEO:"
  resolved = config_lib.model_config(config.model, vocab_size=50257)
  assert (resolved.n_layer, resolved.n_head, resolved.d_model) == (6, 12, 768)


def test_only_text_for_the_model_is_unescaped():
  config = config_lib.default_config()
  config_lib.apply_overrides(config, [
      r"train.trainable=head,backbone/blocks_\d+/attn\b", r"data.path=C:\new\table.txt",
      r"data.separator=\n\n", r"train.sample_prompt=\u2014\tROMEO:"])
  assert config.train.trainable == r"head,backbone/blocks_\d+/attn\b"  # \b: a word boundary
  assert config.data.path == r"C:\new\table.txt"
  assert (config.data.separator, config.train.sample_prompt) == ("\n\n", "\u2014\tROMEO:")


def test_unknown_key_is_named():
  config = config_lib.default_config()
  with pytest.raises(JaxllmError, match=r"unknown config key 'model.n_layr'.*n_layer"):
    config_lib.apply_overrides(config, ["model.n_layr=3"])
  with pytest.raises(JaxllmError, match=r"unknown config key 'modle'"):
    config_lib.apply_overrides(config, ["modle.n_layer=3"])


def test_bad_value_types_are_errors():
  config = config_lib.default_config()
  with pytest.raises(JaxllmError, match="train.steps.*integer.*'ten'"):
    config_lib.apply_overrides(config, ["train.steps=ten"])
  with pytest.raises(JaxllmError, match="train.steps.*integer"):
    config_lib.apply_overrides(config, ["train.steps=2.5"])
  with pytest.raises(JaxllmError, match="true or false"):
    config_lib.apply_overrides(config, ["model.bias=maybe"])


def test_unknown_preset_lists_the_known_ones():
  config = config_lib.default_config()
  config.model.preset = "gpt5"
  with pytest.raises(JaxllmError, match="unknown preset 'gpt5'.*gpt2-small"):
    config_lib.model_config(config.model, vocab_size=100)


def test_experiment_files_load_and_resolve():
  for name, vocab, expected in [("shakespeare_char", 66, (4, 4, 128, 64)),
                                ("verdict_gpt2", 50257, (12, 12, 768, 256)),
                                ("gpt2_owt", 50257, (12, 12, 768, 1024)),
                                ("lm1b_small", 50257, (4, 4, 256, 128))]:
    config = config_lib.load_config(f"experiments/{name}.py")
    resolved = config_lib.model_config(config.model, vocab)
    assert (resolved.n_layer, resolved.n_head, resolved.d_model,
            resolved.context_length) == expected


def test_gpt2_owt_is_nanogpts_batch():
  config = config_lib.load_config("experiments/gpt2_owt.py")
  train = config.train
  rows_per_device = train.batch_size // train.grad_accum // config.mesh.data
  assert (train.batch_size * 1024, rows_per_device) == (491_520, 12)  # nanoGPT: 12 x 40 x 1024
  assert (train.steps, train.warmup_steps, train.learning_rate) == (600_000, 2000, 6e-4)


def test_experiment_file_with_unknown_key(tmp_path):
  path = tmp_path / "bad.py"
  path.write_text("from jaxllm.config import default_config\n"
                  "def get_config():\n  c = default_config()\n  c.train.stepz = 3\n  return c\n")
  with pytest.raises(JaxllmError, match="unknown config key 'train.stepz'"):
    config_lib.load_config(path)


def test_config_json_round_trip():
  config = config_lib.default_config()
  config.model.n_layer = 3
  again = config_lib.from_dict(config.to_dict())
  assert again.to_dict() == config.to_dict()
  assert isinstance(again, ml_collections.ConfigDict)


def test_every_preset_resolves_with_its_own_values():
  for name, preset in config_lib.PRESETS.items():
    config = config_lib.default_config()
    config.model.preset = name
    resolved = config_lib.resolve(config.model, vocab_size=100)
    for key, value in preset.items():
      if key not in ("vocab_size", "architecture"):  # the tokenizer's (100) takes its place
        assert getattr(resolved, key) == value, (name, key)
    assert config_lib.architecture_of(resolved) == preset.get("architecture", "gpt")
  config.model.preset = "qwen2.5-0.5b"
  assert config_lib.model_config(config.model).layer_norm_epsilon == 1e-6


def test_encoder_keys_resolve_and_decoder_keys_are_refused():
  config = config_lib.default_config()
  config_lib.apply_overrides(config, ["model.architecture=bert", "model.n_layer=2",
                                      "model.pre_norm=true", "model.type_vocab_size=3"])
  resolved = config_lib.resolve(config.model, vocab_size=67)
  assert isinstance(resolved, config_lib.EncoderConfig)
  # No preset: bert-nano's sizes, BERT's epsilon.
  assert (resolved.n_layer, resolved.n_head, resolved.d_model, resolved.context_length) == (
      2, 4, 128, 128)
  assert (resolved.pre_norm, resolved.type_vocab_size, resolved.layer_norm_epsilon,
          resolved.vocab_size) == (True, 3, 1e-12, 67)
  with pytest.raises(JaxllmError, match="an encoder: a GPT .decoder. is needed"):
    config_lib.model_config(config.model, vocab_size=67)
  for override, message in [
      ("model.position=rope", r"model.position=rope applies to GPT decoders"),
      ("model.matmul_dtype=bfloat16", r"model.matmul_dtype=bfloat16 applies to GPT decoders"),
      ("model.preset=gpt2-small", r"model.preset 'gpt2-small' is a GPT"),
      ("model.architecture=t5", r"model.architecture must be one of gpt, bert, got 't5'")]:
    bad = config_lib.from_dict(config.to_dict())
    config_lib.apply_overrides(bad, [override])
    with pytest.raises(JaxllmError, match=message):
      config_lib.resolve(bad.model, vocab_size=67)
  gpt = config_lib.default_config()
  gpt.model.pre_norm = True
  with pytest.raises(JaxllmError, match="model.pre_norm applies to encoders"):
    config_lib.resolve(gpt.model, vocab_size=67)


@pytest.mark.parametrize("architecture", ["gpt", "bert"])
def test_float64_needs_jax_64_bit_mode_and_float32_matmuls(architecture):
  config = config_lib.default_config()
  config_lib.apply_overrides(config, [f"model.architecture={architecture}", "model.dtype=float64"])
  assert not jax.config.jax_enable_x64  # the suite runs in JAX's default 32-bit mode
  with pytest.raises(JaxllmError, match="model.dtype=float64 needs JAX's 64-bit mode: run with "
                                        "JAX_ENABLE_X64=1"):
    config_lib.resolve(config.model, vocab_size=67)
  with jax.enable_x64(True):
    assert config_lib.resolve(config.model, vocab_size=67).dtype == "float64"
    if architecture == "gpt":
      config.model.matmul_dtype = "bfloat16"
      with pytest.raises(JaxllmError, match="keep model.matmul_dtype=float32"):
        config_lib.resolve(config.model, vocab_size=67)
  config.model.dtype = "float16"
  with pytest.raises(JaxllmError, match="model.dtype must be one of float32, bfloat16, float64"):
    config_lib.resolve(config.model, vocab_size=67)


@pytest.mark.parametrize("override, message", [
    ("train.grad_accum=0", "train.grad_accum must be at least 1, got 0"),
    ("train.batch_size=0", "train.batch_size must be at least 1, got 0"),
    ("train.eval_every=-1", "train.eval_every must be 0 or more, got -1"),
    ("train.grad_accum=5", "train.batch_size=12 is not divisible by train.grad_accum=5"),
    ("train.schedule=linear", "train.schedule must be cosine, constant or wsd, got 'linear'"),
])
def test_unusable_train_values_are_one_line_errors(override, message):
  config = config_lib.default_config()
  config_lib.apply_overrides(config, [override])
  with pytest.raises(JaxllmError, match=re.escape(message)):
    config_lib.check_train(config.train)


def test_an_interval_of_zero_is_never():
  assert [d for d in range(1, 13) if config_lib.every(d, 4)] == [4, 8, 12]
  assert not any(config_lib.every(d, 0) for d in range(1, 13))
