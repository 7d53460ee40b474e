"""Heads as pure functions over the backbone's hidden states."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import config as config_lib
from jaxllm.models import heads
from jaxllm.models.gpt import GPT, init_params

TINY = config_lib.ModelConfig(vocab_size=40, context_length=16, n_layer=2, n_head=2, d_model=32)


@functools.partial(jax.jit, static_argnums=0)
def _hidden(model, params, tokens_BxL):
  hidden_BxLxD, _ = model.apply({"params": params}, jnp.asarray(tokens_BxL), method=model.encode)
  return hidden_BxLxD


def test_classifier_reads_the_last_real_token_whatever_the_padding():
  model = GPT(TINY)
  params = init_params(model, jax.random.key(0))
  head = heads.classifier_init(jax.random.key(1), TINY.d_model, 3)
  rng = np.random.default_rng(0)
  length_B = np.array([5, 9, 12], np.int32)
  texts = [rng.integers(0, 39, size=n) for n in length_B]

  def logits(pad_id, width):
    tokens_BxL = np.full((3, width), pad_id, np.int32)
    for row, text in enumerate(texts):
      tokens_BxL[row, :len(text)] = text
    last_BxD = heads.last_token(_hidden(model, params, tokens_BxL), jnp.asarray(length_B))
    return np.asarray(heads.classifier_apply(head, last_BxD))

  reference_Bx3 = logits(pad_id=39, width=12)
  assert reference_Bx3.shape == (3, 3)
  # Another pad id, more padding: causal attention keeps both out of the last real token.
  np.testing.assert_allclose(logits(pad_id=0, width=12), reference_Bx3, atol=1e-6)
  np.testing.assert_allclose(logits(pad_id=7, width=16), reference_Bx3, atol=1e-6)
  # Reading the last position instead (the book's [:, -1]) sees the padding.
  tokens_BxL = np.full((3, 16), 7, np.int32)
  for row, text in enumerate(texts):
    tokens_BxL[row, :len(text)] = text
  at_end_Bx3 = heads.classifier_apply(head, _hidden(model, params, tokens_BxL)[:, -1])
  assert np.abs(np.asarray(at_end_Bx3) - reference_Bx3).max() > 1e-3


def test_last_token_picks_index_length_minus_one():
  hidden_BxLxD = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3)
  last_BxD = heads.last_token(hidden_BxLxD, jnp.array([2, 4]))
  np.testing.assert_array_equal(last_BxD, [[3.0, 4.0, 5.0], [21.0, 22.0, 23.0]])


def test_classifier_head_is_an_affine_map_in_float32():
  params = {"kernel": jnp.array([[1.0, 0.0, 2.0], [0.0, -1.0, 0.5]]),
            "bias": jnp.array([0.5, 0.0, -1.0])}
  hidden_BxD = jnp.array([[1.0, 2.0], [-3.0, 4.0]], jnp.bfloat16)
  logits_BxC = heads.classifier_apply(params, hidden_BxD)
  assert logits_BxC.dtype == jnp.float32  # bf16 states, float32 logits
  # [1, 2] -> [1 + 0.5, -2, 2 + 1 - 1]; [-3, 4] -> [-3 + 0.5, -4, -6 + 2 - 1]
  np.testing.assert_array_equal(logits_BxC, [[1.5, -2.0, 2.0], [-2.5, -4.0, -5.0]])


def test_classifier_init_is_gpt2s_scale_and_a_zero_bias():
  head = heads.classifier_init(jax.random.key(5), 256, 4)
  assert head["kernel"].shape == (256, 4) and head["kernel"].dtype == jnp.float32
  assert float(jnp.std(head["kernel"])) == pytest.approx(0.02, rel=0.05)  # 1,024 draws
  assert abs(float(jnp.mean(head["kernel"]))) < 0.002
  np.testing.assert_array_equal(head["bias"], np.zeros(4))
  # A seeded draw: the same key, the same head.
  np.testing.assert_array_equal(head["kernel"],
                                heads.classifier_init(jax.random.key(5), 256, 4)["kernel"])
