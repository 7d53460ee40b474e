import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxllm.config import PRESETS, ModelConfig
from jaxllm.models import stacking
from jaxllm.models.gpt import (
  GPT,
  abstract_variables,
  count_params,
  init_cache,
  init_params,
  logical_axes,
)
from jaxllm.models.stacking import stack_layers
from jaxllm.serve import generate

CONFIG = ModelConfig(vocab_size=97, context_length=64, n_layer=2, n_head=4, d_model=64)
GPT2_VOCAB = 50257


@pytest.fixture(scope="module")
def params():
  return init_params(GPT(CONFIG), jax.random.key(0))


@pytest.fixture(scope="module")
def tokens_BxL():
  return jax.random.randint(jax.random.key(1), (3, 40), 0, CONFIG.vocab_size)


def _count(config: ModelConfig) -> int:
  # eval_shape: the 1.5B-parameter model is counted without allocating a byte of it.
  return count_params(nn.unbox(abstract_variables(GPT(config)))["params"])


@pytest.mark.parametrize("preset, expected", [
    ("gpt2-small", 124_439_808),
    ("gpt2-medium", 354_823_168),
    ("gpt2-large", 774_030_080),
    ("gpt2-xl", 1_557_611_200),
])
def test_preset_parameter_counts(preset, expected):
  assert _count(ModelConfig(vocab_size=GPT2_VOCAB, **PRESETS[preset])) == expected


def test_untied_head_adds_one_vocab_by_embed_matrix():
  config = ModelConfig(vocab_size=GPT2_VOCAB, **PRESETS["gpt2-small"])
  untied = dataclasses.replace(config, tie_embeddings=False)
  assert _count(untied) - _count(config) == GPT2_VOCAB * 768


def test_causal_masking(params, tokens_BxL):
  model = GPT(CONFIG)
  logits_BxLxV = model.apply({"params": params}, tokens_BxL)
  t = 17
  changed_BxL = tokens_BxL.at[:, t].set((tokens_BxL[:, t] + 1) % CONFIG.vocab_size)
  changed_BxLxV = model.apply({"params": params}, changed_BxL)
  # Exactly equal before t: masked positions contribute exact zeros, not small numbers.
  np.testing.assert_array_equal(changed_BxLxV[:, :t], logits_BxLxV[:, :t])
  assert np.all(np.abs(changed_BxLxV[:, t] - logits_BxLxV[:, t]).max(axis=-1) > 1e-3)


def test_tied_and_untied_heads(params, tokens_BxL):
  model = GPT(CONFIG)
  logits_BxLxV, hidden_BxLxD = model.apply({"params": params}, tokens_BxL, return_hidden=True)
  # Tolerance 1e-6 absolute on logits of magnitude ~1 (it is exact on CPU today).
  np.testing.assert_allclose(logits_BxLxV, hidden_BxLxD @ params["wte"]["embedding"].T,
                             atol=1e-6, rtol=0)
  assert "lm_head" not in params

  untied = GPT(dataclasses.replace(CONFIG, tie_embeddings=False))
  untied_params = init_params(untied, jax.random.key(0))
  assert untied_params["lm_head"]["kernel"].shape == (CONFIG.d_model, CONFIG.vocab_size)
  untied_BxLxV, untied_hidden_BxLxD = untied.apply(
      {"params": untied_params}, tokens_BxL, return_hidden=True)
  np.testing.assert_allclose(untied_BxLxV,
                             untied_hidden_BxLxD @ untied_params["lm_head"]["kernel"],
                             atol=1e-6, rtol=0)
  tied_view_BxLxV = untied_hidden_BxLxD @ untied_params["wte"]["embedding"].T
  assert np.abs(untied_BxLxV - tied_view_BxLxV).max() > 0.1


def test_return_hidden_matches_logits_method(params, tokens_BxL):
  model = GPT(CONFIG)
  logits_BxLxV, hidden_BxLxD = model.apply({"params": params}, tokens_BxL, return_hidden=True)
  assert hidden_BxLxD.shape == (*tokens_BxL.shape, CONFIG.d_model)
  assert logits_BxLxV.shape == (*tokens_BxL.shape, CONFIG.vocab_size)
  np.testing.assert_array_equal(
      model.apply({"params": params}, hidden_BxLxD, method=model.logits), logits_BxLxV)
  np.testing.assert_array_equal(model.apply({"params": params}, tokens_BxL), logits_BxLxV)


def test_sequence_longer_than_context_raises(params):
  too_long_BxL = jnp.zeros((1, CONFIG.context_length + 1), jnp.int32)
  with pytest.raises(ValueError, match="sequence length 65 exceeds context_length 64"):
    GPT(CONFIG).apply({"params": params}, too_long_BxL)


def test_bfloat16_compute(params, tokens_BxL):
  reference_BxLxV = GPT(CONFIG).apply({"params": params}, tokens_BxL)
  model = GPT(dataclasses.replace(CONFIG, dtype="bfloat16"))
  assert all(x.dtype == jnp.float32
             for x in jax.tree.leaves(init_params(model, jax.random.key(0))))
  logits_BxLxV, hidden_BxLxD = model.apply({"params": params}, tokens_BxL, return_hidden=True)
  assert hidden_BxLxD.dtype == jnp.bfloat16
  assert logits_BxLxV.dtype == jnp.float32
  # bfloat16 keeps ~3 significant digits; on logits up to ~1.1 the max error is ~4e-3,
  # so 2e-2 absolute. Not bit-equal: the computation really ran in bfloat16.
  difference = np.abs(logits_BxLxV - reference_BxLxV).max()
  assert 0 < difference < 2e-2


def _decoded_logits(model, params, tokens_BxL, cache, prefill: int):
  """Logits of a `prefill`-token prefill, then one token at a time through the KV cache."""
  batch_size, length = tokens_BxL.shape
  encode = jax.jit(lambda tokens_BxL, positions_BxL, cache: model.apply(
      {"params": params}, tokens_BxL, positions_BxL, cache, method=model.encode))
  chunks = [(0, prefill)] + [(t, t + 1) for t in range(prefill, length)]
  hidden = []
  for start, end in chunks:
    positions_BxL = jnp.broadcast_to(jnp.arange(start, end), (batch_size, end - start))
    hidden_BxLxD, cache = encode(tokens_BxL[:, start:end], positions_BxL, cache)
    hidden.append(hidden_BxLxD)
  return model.apply({"params": params}, jnp.concatenate(hidden, axis=1), method=model.logits)


def test_cached_forward_matches_full_forward(params, tokens_BxL):
  model = GPT(CONFIG)
  reference_BxLxV = model.apply({"params": params}, tokens_BxL)
  cache = init_cache(CONFIG, *tokens_BxL.shape)
  logits_BxLxV = _decoded_logits(model, params, tokens_BxL, cache, prefill=5)
  # Same math in another order: ~2e-7 on CPU, asserted to 1e-5.
  np.testing.assert_allclose(logits_BxLxV, reference_BxLxV, atol=1e-5, rtol=0)


def test_default_tree_is_unscanned_and_scan_stacks_it():
  assert {f"blocks_{i}" for i in range(CONFIG.n_layer)} <= init_params(
      GPT(CONFIG), jax.random.key(0)).keys()
  scanned = GPT(dataclasses.replace(CONFIG, scan_layers=True))
  shapes = nn.unbox(abstract_variables(scanned))["params"]
  assert "blocks_0" not in shapes
  assert shapes["blocks"]["mlp"]["fc"]["kernel"].shape == (2, 64, 256)
  assert logical_axes(scanned)["blocks"]["mlp"]["fc"]["kernel"] == P("layers", "embed", "mlp")


def _value_and_grad(model, params, tokens_BxL):
  return jax.jit(jax.value_and_grad(
      lambda p: model.apply({"params": p}, tokens_BxL).mean()))(params)


@pytest.fixture(scope="module")
def reference_value_and_grad(params, tokens_BxL):
  return _value_and_grad(GPT(CONFIG), params, tokens_BxL)


@pytest.mark.parametrize("remat, scan", [("full", False), ("dots", False), ("full", True)])
def test_remat_and_scan_compute_the_same_function(params, tokens_BxL, reference_value_and_grad,
                                                  remat, scan):
  model = GPT(dataclasses.replace(CONFIG, remat=remat, scan_layers=scan))
  these = stack_layers(params, CONFIG.n_layer) if scan else params
  reference, reference_grads = reference_value_and_grad
  value, grads = _value_and_grad(model, these, tokens_BxL)
  np.testing.assert_allclose(value, reference, atol=1e-6, rtol=0)
  expected = stack_layers(reference_grads, CONFIG.n_layer) if scan else reference_grads
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


def test_scanned_model_decodes_with_a_cache(params, tokens_BxL):
  model = GPT(dataclasses.replace(CONFIG, scan_layers=True))
  stacked = stack_layers(params, CONFIG.n_layer)
  reference_BxLxD, _ = GPT(CONFIG).apply({"params": params}, tokens_BxL[:, :6],
                                         method=GPT.encode)
  encode = jax.jit(lambda tokens_BxL, positions_BxL, cache: model.apply(
      {"params": stacked}, tokens_BxL, positions_BxL, cache, method=GPT.encode))
  cache = init_cache(model.config, tokens_BxL.shape[0], 8)  # stacked: L x B x S x H x K
  positions = jnp.broadcast_to(jnp.arange(6), (tokens_BxL.shape[0], 6))
  prefill_BxLxD, cache = encode(tokens_BxL[:, :5], positions[:, :5], cache)
  step_BxLxD, cache = encode(tokens_BxL[:, 5:6], positions[:, 5:6], cache)
  assert cache["k"].shape == (CONFIG.n_layer, 3, 8, 4, 16)
  # A decode step never stacks the layers' caches into one (a full copy per token).
  step_text = encode.lower(tokens_BxL[:, 5:6], positions[:, 5:6], cache).as_text()
  assert not re.search(r"concatenate[^\n]*-> tensor<2x3x8x4x16xf32>", step_text)
  np.testing.assert_allclose(jnp.concatenate([prefill_BxLxD, step_BxLxD], axis=1),
                             reference_BxLxD, atol=1e-5, rtol=0)



def test_scanned_model_generates_the_unscanned_tokens(params):
  prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
  scanned = GPT(dataclasses.replace(CONFIG, scan_layers=True))
  out = generate.generate(scanned, stack_layers(params, CONFIG.n_layer), prompts, 6,
                          temperature=0.0)
  assert out == generate.generate(GPT(CONFIG), params, prompts, 6, temperature=0.0)
  # and unstacked again: the per-layer params of a scanned run
  assert stacking.unstack_layers(stack_layers(params, CONFIG.n_layer)).keys() == params.keys()

# --- Llama-family options ---------------------------------------------------------------------

LLAMA = ModelConfig(vocab_size=97, context_length=64, n_layer=2, n_head=4, d_model=64,
                    n_kv_head=2, norm="rmsnorm", position="rope", mlp="swiglu", mlp_hidden=96,
                    bias=False, qkv_bias=True, tie_embeddings=False, qk_norm=True,
                    rope_theta=500000.0, rope_scaling_factor=8.0, rope_original_context=64)


@pytest.mark.parametrize("preset, expected", [
    # Hugging Face's counts for these checkpoints (tied embeddings).
    ("smollm2-135m", 134_515_008),
    ("qwen2.5-0.5b", 494_032_768),
    ("llama-3.2-1b", 1_235_814_400),
])
def test_open_model_preset_parameter_counts(preset, expected):
  from jaxllm.config import default_config, model_config
  config = default_config()
  config.model.preset = preset
  assert _count(model_config(config.model)) == expected


def test_llama_options_build_the_named_parameters():
  params = init_params(GPT(LLAMA), jax.random.key(0))
  assert "wpe" not in params and "lm_head" in params
  block = jax.tree.map(lambda x: x.shape, params["blocks_0"])
  assert block["attn"]["q"] == {"kernel": (64, 4, 16), "bias": (4, 16)}
  assert block["attn"]["kv"] == {"kernel": (64, 2, 2, 16), "bias": (2, 2, 16)}
  assert block["attn"]["q_norm"] == {"scale": (16,)} and block["ln_1"] == {"scale": (64,)}
  assert block["mlp"]["gate"] == {"kernel": (64, 96)} and block["mlp"]["proj"] == {
      "kernel": (96, 64)}
  axes = logical_axes(GPT(LLAMA))["blocks_0"]["attn"]["kv"]["kernel"]
  assert tuple(axes) == ("embed", None, "kv_heads", "kv")


def test_llama_cache_holds_kv_heads_and_decodes_like_the_full_forward(tokens_BxL):
  model = GPT(LLAMA)
  params = init_params(model, jax.random.key(0))
  reference_BxLxV = model.apply({"params": params}, tokens_BxL)
  batch_size, length = tokens_BxL.shape
  cache = init_cache(LLAMA, batch_size, length)
  assert cache[0]["k"].shape == (batch_size, length, 2, 16)  # kv heads only
  logits_BxLxV = _decoded_logits(model, params, tokens_BxL, cache, prefill=7)
  np.testing.assert_allclose(logits_BxLxV, reference_BxLxV, atol=1e-5, rtol=0)


def test_rotary_attention_depends_on_relative_positions_only():
  from jaxllm.models.gpt import apply_rope, rope_frequencies
  inv_freq = rope_frequencies(LLAMA)
  q = jax.random.normal(jax.random.key(0), (1, 1, 1, 16))
  k = jax.random.normal(jax.random.key(1), (1, 1, 1, 16))

  def score(i, j):
    return float(jnp.sum(apply_rope(q, jnp.array([[i]]), inv_freq) *
                         apply_rope(k, jnp.array([[j]]), inv_freq)))

  assert abs(score(3, 1) - score(13, 11)) < 1e-5 and abs(score(3, 1) - score(3, 2)) > 1e-3
  # Llama 3's scaling: the highest frequency kept, the lowest divided by the factor.
  plain = rope_frequencies(dataclasses.replace(LLAMA, rope_scaling_factor=0.0))
  assert inv_freq[0] == plain[0] and np.isclose(inv_freq[-1], plain[-1] / 8.0)
