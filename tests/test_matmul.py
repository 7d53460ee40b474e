"""The bf16-operand matmul option (model.matmul_dtype = "bfloat16"): exact products, the same
parameters as float32, and training losses that track float32's."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train import _lm_step

from jaxllm import cli
from jaxllm.config import default_config, model_config
from jaxllm.models import matmul
from jaxllm.models.gpt import GPT, init_params
from jaxllm.training import step as train_lib

BF16 = jnp.bfloat16


def _rounded(x):
  return np.asarray(x.astype(BF16).astype(jnp.float32), np.float64)


@pytest.mark.parametrize("transpose_b", [False, True])
def test_products_and_gradients_are_bf16_operands_with_float32_sums(transpose_b):
  a = jax.random.normal(jax.random.key(0), (24, 40))
  b = jax.random.normal(jax.random.key(1), (16, 40) if transpose_b else (40, 16))
  g = jax.random.normal(jax.random.key(2), (24, 16))
  y, vjp = jax.vjp(lambda a, b: matmul.bf16_matmul(a, b, transpose_b), a, b)
  da, db = vjp(g)
  # The same products in float64 from bf16-rounded operands: float32 accumulation of 40 or 24
  # terms is all that separates them.
  a64, b64, g64 = _rounded(a), _rounded(b), _rounded(g)
  b64 = b64.T if transpose_b else b64
  np.testing.assert_allclose(y, a64 @ b64, rtol=0, atol=1e-5)
  np.testing.assert_allclose(da, g64 @ b64.T, rtol=0, atol=1e-5)
  np.testing.assert_allclose(db, (a64.T @ g64).T if transpose_b else a64.T @ g64, rtol=0, atol=1e-5)
  assert y.dtype == da.dtype == db.dtype == jnp.float32
  # ... and not float32 products: bf16 rounding shows.
  assert np.abs(np.asarray(y) - np.asarray(a) @ (np.asarray(b).T if transpose_b else np.asarray(b))
                ).max() > 1e-3


def _gpt2_small_shapes(matmul_dtype):
  c = default_config()
  c.model.preset = "gpt2-small"
  c.model.context_length = 64
  c.model.scan_layers = True  # compiles one block, not twelve
  c.model.matmul_dtype = matmul_dtype
  return GPT(model_config(c.model, vocab_size=50257)), c.train


def test_gpt2_small_shapes_train_like_float32():
  """Three AdamW steps of GPT-2 small's 12 x 768 layers and 50,257-token vocabulary (the
  context cut to 64 to keep it cheap): the same parameters and losses within 5e-3."""
  tokens = jax.random.randint(jax.random.key(3), (1, 2, 65), 0, 50257)
  batch = {"inputs": tokens[:, :, :-1], "targets": tokens[:, :, 1:]}
  losses = {}
  for dtype in ("float32", "bfloat16"):
    model, train = _gpt2_small_shapes(dtype)
    train.learning_rate, train.warmup_steps = 3e-4, 0
    params = init_params(model, jax.random.key(0))
    assert params["blocks"]["mlp"]["fc"]["kernel"].shape == (12, 768, 3072)
    optimizer = train_lib.make_optimizer(train, total_steps=3)
    state = train_lib.create_train_state(params, optimizer, seed=0)
    step = _lm_step(model, optimizer)
    losses[dtype] = []
    for _ in range(3):
      state, metrics = step(state, batch)
      losses[dtype].append(float(metrics["loss"]))
    if dtype == "float32":
      first = params
    else:  # same names, shapes and initial values: checkpoints move between the two
      assert jax.tree.structure(params) == jax.tree.structure(first)
      assert all(jax.tree.leaves(jax.tree.map(lambda x, y: bool((x == y).all()), params, first)))
  # Measured: |diff| <= 1.5e-3 at losses 10.95 -> 8.93 (bf16 operands keep 8 significant bits).
  np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=0, atol=5e-3)
  assert losses["float32"][-1] < losses["float32"][0] - 0.5  # it did learn (memorising 2 rows)


def test_shakespeare_100_steps_track_float32(tmp_path, capsys):
  """nanoGPT's CPU Shakespeare config for 100 steps, float32 and bf16 matmuls: every logged
  train loss within 1.5e-3 (measured: 1.4e-4), validation losses too. (Input gradients 10 %
  off in the backward pass move a loss by 1.5e-2, by step 60.)"""
  records = {}
  for dtype in ("float32", "bfloat16"):
    workdir = tmp_path / dtype
    assert cli.main(["train", "--config", "experiments/shakespeare_char.py", "--workdir",
                     str(workdir), "--config.train.steps=100", "--config.train.decay_steps=100",
                     "--config.train.eval_every=50", "--config.train.eval_batches=5",
                     "--config.train.sample_tokens=0", "--config.train.peak_flops=1e11",
                     "--config.checkpoint.every_steps=0", f"--config.model.matmul_dtype={dtype}",
                     "--no-progress"]) == 0
    records[dtype] = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
  capsys.readouterr()
  for key in ("loss", "val_loss"):
    f32, bf16 = ([r[key] for r in records[d] if key in r] for d in ("float32", "bfloat16"))
    assert len(f32) == len(bf16) >= 3
    np.testing.assert_allclose(bf16, f32, rtol=0, atol=1.5e-3)
  assert records["float32"][-1]["val_loss"] < 2.75  # from 4.2 (measured: 2.64)
