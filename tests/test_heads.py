"""Heads as pure functions over the backbone's hidden states."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import config as config_lib
from jaxllm import heads
from jaxllm.model import GPT, init_params

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


def test_lm_head_is_the_models_own_logits_tied_and_untied():
  tokens_BxL = jnp.asarray(np.random.default_rng(1).integers(0, 40, size=(2, 10)), jnp.int32)
  for tie in (True, False):
    model = GPT(config_lib.ModelConfig(**{**TINY.__dict__, "tie_embeddings": tie}))
    params = init_params(model, jax.random.key(2))
    expected_BxLxV = model.apply({"params": params}, tokens_BxL)
    logits_BxLxV = heads.lm_apply(heads.lm_params(params), _hidden(model, params, tokens_BxL))
    assert logits_BxLxV.shape == (2, 10, 40) and logits_BxLxV.dtype == jnp.float32
    np.testing.assert_allclose(logits_BxLxV, expected_BxLxV, atol=1e-5)
  untied = heads.lm_init(jax.random.key(3), 32, 40)
  assert untied["kernel"].shape == (32, 40)


def test_head_shapes_and_a_zero_head_is_uninformative():
  hidden_BxD = jax.random.normal(jax.random.key(4), (5, 32))
  classifier = heads.classifier_init(jax.random.key(5), 32, 2)
  assert classifier["kernel"].shape == (32, 2) and classifier["bias"].shape == (2,)
  assert heads.classifier_apply(classifier, hidden_BxD).shape == (5, 2)
  reward = heads.reward_init(jax.random.key(6), 32)
  assert heads.reward_apply(reward, hidden_BxD).shape == (5,)
  zero = jax.tree.map(jnp.zeros_like, classifier)
  np.testing.assert_array_equal(heads.classifier_apply(zero, hidden_BxD), np.zeros((5, 2)))
