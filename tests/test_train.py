import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxllm import config as config_lib
from jaxllm import data as data_lib
from jaxllm.models.gpt import GPT, init_params
from jaxllm.training import step as train_lib

TINY = config_lib.ModelConfig(vocab_size=32, context_length=16, n_layer=2, n_head=2, d_model=32)


def _train_config(**overrides):
  train = config_lib.default_config().train
  train.warmup_steps = 0
  for key, value in overrides.items():
    train[key] = value
  return train


def _batch(tokens_A_B_L1):
  tokens = jnp.asarray(tokens_A_B_L1, jnp.int32)
  return {"inputs": tokens[..., :-1], "targets": tokens[..., 1:]}


def _lm_step(model, optimizer, deterministic=True):
  """The jitted train step of next-token prediction."""
  loss_fn = functools.partial(train_lib.lm_loss, model=model, deterministic=deterministic)
  return jax.jit(functools.partial(train_lib.train_step, loss_fn=loss_fn, optimizer=optimizer))


def test_tiny_model_overfits_tiny_corpus():
  # 4 fixed sequences of 16 tokens: a 2-layer model must memorise them.
  rng = np.random.default_rng(0)
  batch = _batch(rng.integers(0, TINY.vocab_size, size=(1, 4, TINY.context_length + 1)))
  model = GPT(TINY)
  train = _train_config(learning_rate=1e-2, schedule="constant", weight_decay=0.0)
  optimizer = train_lib.make_optimizer(train, total_steps=200)
  state = train_lib.create_train_state(init_params(model, jax.random.key(0)), optimizer, seed=1)
  step = _lm_step(model, optimizer)
  state, metrics = step(state, batch)
  first = float(metrics["loss"])
  for _ in range(199):
    state, metrics = step(state, batch)
  # Untrained: about ln(32) = 3.47. Memorised: below 0.05 (measured 0.002).
  assert abs(first - math.log(TINY.vocab_size)) < 0.1
  assert float(metrics["loss"]) < 0.05
  assert int(state.step) == 200


def test_gradient_accumulation_matches_one_big_batch():
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, TINY.vocab_size, size=(4, TINY.context_length + 1))
  model = GPT(TINY)
  params = init_params(model, jax.random.key(0))
  # Plain SGD with lr 1 makes the parameter change equal to the gradient (Adam's first step
  # would amplify float rounding in near-zero gradients to +-lr).
  optimizer = optax.sgd(1.0)
  step = _lm_step(model, optimizer)
  whole, m_whole = step(train_lib.create_train_state(params, optimizer, 0), _batch(tokens[None]))
  split, m_split = step(train_lib.create_train_state(params, optimizer, 0),
                        _batch(tokens.reshape(2, 2, -1)))
  np.testing.assert_allclose(m_whole["loss"], m_split["loss"], rtol=1e-6)
  np.testing.assert_allclose(m_whole["grad_norm"], m_split["grad_norm"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(split.params)):
    np.testing.assert_allclose(a, b, atol=1e-6)  # float32 summation order


def test_weight_decay_only_on_matrices():
  params = init_params(GPT(TINY), jax.random.key(0))
  mask = train_lib.weight_decay_mask(params)
  assert mask["wte"]["embedding"] and mask["blocks_0"]["attn"]["qkv"]["kernel"]
  # The fused qkv bias is 3-D but is still a bias: no decay.
  assert not mask["blocks_0"]["attn"]["qkv"]["bias"]
  assert not mask["blocks_0"]["ln_1"]["scale"] and not mask["ln_f"]["bias"]
  decayed = sum(x.size for x, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if m)
  assert decayed == 32 * 32 + 16 * 32 + 2 * (32 * 96 + 32 * 32 + 2 * 32 * 128)


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clipping_matches_optax_up_to_rounding(max_norm):
  grads = {"a": jax.random.normal(jax.random.key(0), (64, 32)),
           "b": jax.random.normal(jax.random.key(1), (32,))}
  ours, _ = train_lib.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
  theirs, _ = optax.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
  if max_norm == 100.0:  # below the threshold: untouched, bit for bit
    assert all(bool((ours[k] == grads[k]).all()) for k in grads)
  else:  # one scalar factor instead of a division per element: rounding apart
    assert float(optax.tree.norm(ours)) == pytest.approx(max_norm, rel=1e-6)
  for k in grads:
    np.testing.assert_allclose(ours[k], theirs[k], rtol=1e-6, atol=0)


def test_learning_rate_schedule_follows_nanogpt():
  train = _train_config(learning_rate=1e-3, min_learning_rate=1e-4, warmup_steps=100,
                        decay_steps=2000)
  schedule = train_lib.learning_rate_schedule(train, total_steps=2000)
  assert float(schedule(0)) == pytest.approx(1e-3 / 101, rel=1e-5)
  assert float(schedule(100)) == pytest.approx(1e-3)
  assert float(schedule(1050)) == pytest.approx(1e-4 + 0.5 * 0.9e-3, rel=1e-5)
  assert float(schedule(2000)) == pytest.approx(1e-4)
  constant = train_lib.learning_rate_schedule(
      _train_config(schedule="constant", learning_rate=4e-4), total_steps=10)
  assert float(constant(0)) == float(constant(9)) == pytest.approx(4e-4)


def test_train_step_is_deterministic():
  rng = np.random.default_rng(2)
  batch = _batch(rng.integers(0, TINY.vocab_size, size=(1, 2, TINY.context_length + 1)))
  dropout_model = GPT(config_lib.ModelConfig(**{**TINY.__dict__, "dropout": 0.1}))
  optimizer = train_lib.make_optimizer(_train_config(), total_steps=10)
  step = _lm_step(dropout_model, optimizer, deterministic=False)
  params = init_params(dropout_model, jax.random.key(0))
  losses = []
  for _ in range(2):
    state = train_lib.create_train_state(params, optimizer, seed=5)
    for _ in range(3):
      state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[0] == losses[1]


def test_eval_step_weighs_tokens():
  model = GPT(TINY)
  params = init_params(model, jax.random.key(0))
  rng = np.random.default_rng(3)
  batch = _batch(rng.integers(0, TINY.vocab_size, size=(3, TINY.context_length + 1)))
  total, count = train_lib.eval_step(params, batch, model=model)
  assert float(count) == 3 * TINY.context_length
  mean, _ = train_lib.lm_loss(params, batch, None, model=model)
  np.testing.assert_allclose(float(total) / float(count), float(mean), rtol=1e-6)
  # Padded to 5 rows (a short last batch on a mesh): the 2 zero-weight rows change nothing.
  padded = data_lib.pad_batch(jax.device_get(batch), 5)
  padded_total, padded_count = train_lib.eval_step(params, padded, model=model)
  assert float(padded_count) == float(count)
  np.testing.assert_allclose(float(padded_total), float(total), rtol=1e-6)


def test_flops_per_token_convention():
  model = GPT(TINY)
  n = sum(x.size for x in jax.tree.leaves(init_params(model, jax.random.key(0))))
  expected = 6 * (n - 16 * 32) + 12 * 2 * 32 * 16
  assert train_lib.flops_per_token(model, n) == expected


def test_flops_per_token_at_a_padded_length_and_with_a_reference():
  # TINY: 2 layers, d_model 32, context 16, vocab 32. N = 27,008 parameters: the tied
  # embedding 32 x 32 = 1,024, positions 16 x 32 = 512, per block 2 LayerNorms (128) + qkv
  # (3,168) + out (1,056) + MLP (4,224 + 4,128) = 12,704, the final LayerNorm 64.
  model = GPT(TINY)
  n = sum(x.size for x in jax.tree.leaves(init_params(model, jax.random.key(0))))
  assert n == 1024 + 512 + 2 * 12704 + 64 == 27008
  # 6 (N - 512) + 12 * 2 * 32 * 16: the attention term at the context length ...
  assert train_lib.flops_per_token(model, n) == 6 * 26496 + 12288 == 171264
  # ... or at the batch's length, 8 tokens a row when a finetuning batch is padded to 8.
  assert train_lib.flops_per_token(model, n, length=8) == 6 * 26496 + 6144 == 165120
  # DPO: the frozen reference's forward pass is a third of a trained one's, 2N + 4 L d T.
  assert (train_lib.flops_per_token(model, n, length=8, reference=True)
          == 165120 + 2 * 26496 + 4 * 2 * 32 * 8 == 220160)
  # Rotary positions: no position table to leave out of N (27,008 - 512 parameters).
  rope = GPT(config_lib.ModelConfig(**{**TINY.__dict__, "position": "rope"}))
  n_rope = sum(x.size for x in jax.tree.leaves(init_params(rope, jax.random.key(0))))
  assert n_rope == 26496
  assert train_lib.flops_per_token(rope, n_rope, length=8) == 165120

