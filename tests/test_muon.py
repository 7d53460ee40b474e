"""train.optimizer=muon (jaxllm/training/muon.py) and train.schedule=wsd: Muon's update against
Newton–Schulz written out in NumPy, its singular values, which leaves it takes, its losses on
three meshes, exact resume after SIGKILL; the wsd schedule's values; their one-line errors."""

import json
import math
import pathlib
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from optax import contrib
from test_checkpoint import _finish, _params, _records, _start, _steps, compile_cache  # noqa: F401

from jaxllm import config as config_lib
from jaxllm.errors import JaxllmError
from jaxllm.models.gpt import GPT
from jaxllm.tools import vectorized
from jaxllm.training import muon as muon_lib
from jaxllm.training import sharding
from jaxllm.training import step as train_lib

REPO = pathlib.Path(__file__).resolve().parents[1]

# optax.contrib's default quintic coefficients (the speedrun's), five iterations.
COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g, steps=5):
  """optax.contrib.orthogonalize_via_newton_schulz in float64 NumPy: the wide side last,
  Frobenius normalisation (+1e-8), X <- aX + (bA + cA^2)X with A = XX^T."""
  x = np.asarray(g, np.float64)
  wide = x.shape[0] <= x.shape[1]
  x = x if wide else x.T
  x = x / (np.linalg.norm(x) + 1e-8)
  a, b, c = COEFFS
  for _ in range(steps):
    gram = x @ x.T
    x = a * x + (b * gram + c * gram @ gram) @ x
  return x if wide else x.T


def _train(**overrides):
  train = config_lib.default_config().train
  train.update(dict(optimizer="muon", schedule="constant", warmup_steps=0, grad_clip=0.0,
                    learning_rate=1e-3, muon_learning_rate=0.02))
  train.update(overrides)
  return train


def _abstract(preset, scan_layers=False):
  config = config_lib.default_config()
  config.model.preset, config.model.scan_layers = preset, scan_layers
  return sharding.model_axes(GPT(config_lib.model_config(config.model, vocab_size=65)))[0]


def _random_like(tree, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), tree)


def _paths(tree, label):
  return sorted(jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_leaves_with_path(tree)
                if x == label)


def test_one_update_matches_numpy_newton_schulz():
  """Three steps of a wide (24x40) and a tall (40x24) matrix: Nesterov momentum with optax's
  bias corrections, momentum warming up 0.85 -> 0.90 -> 0.95, five Newton–Schulz iterations,
  sqrt(max(1, fan_out / fan_in)), decoupled weight decay; all to 1e-5 of the update / lr."""
  rng = np.random.default_rng(0)
  params = {"blocks_0": {"mlp": {"fc": {"kernel": rng.normal(size=(24, 40))},
                                 "proj": {"kernel": rng.normal(size=(40, 24))}}}}
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  train = _train(muon_momentum_warmup_steps=2, muon_weight_decay=0.1)
  optimizer = train_lib.make_optimizer(train, 3)
  state, update = optimizer.init(params), jax.jit(optimizer.update)
  weights = {name: np.asarray(params["blocks_0"]["mlp"][name]["kernel"], np.float64)
             for name in ("fc", "proj")}
  momentum = {name: np.zeros_like(w) for name, w in weights.items()}
  for t, beta in enumerate((0.85, 0.90, 0.95), start=1):
    g = {name: rng.normal(size=w.shape).astype(np.float32) for name, w in weights.items()}
    grads = {"blocks_0": {"mlp": {name: {"kernel": x} for name, x in g.items()}}}
    updates, state = update(grads, state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    for name, w in weights.items():
      momentum[name] = beta * momentum[name] + (1 - beta) * g[name]
      nesterov = (beta * momentum[name] / (1 - beta ** (t + 1))
                  + (1 - beta) * g[name] / (1 - beta ** t))
      scale = math.sqrt(max(1.0, w.shape[1] / w.shape[0]))  # sqrt(40/24) for fc, 1 for proj
      want = -0.02 * (scale * newton_schulz(nesterov) + 0.1 * w)
      got = np.asarray(updates["blocks_0"]["mlp"][name]["kernel"], np.float64)
      np.testing.assert_allclose(got / 0.02, want / 0.02, atol=1e-5, rtol=0)
      weights[name] = w + want


def test_the_update_is_optax_contrib_muons():
  """Muon's leaves move exactly as under optax.contrib.muon given the same dimension numbers
  (momentum constant: optax takes one beta)."""
  abstract = _abstract("gpt-micro")
  params, grads = _random_like(abstract, 1), _random_like(abstract, 2)
  ours = train_lib.make_optimizer(_train(muon_momentum_warmup_steps=0), 10)
  theirs = contrib.muon(0.02, adam_learning_rate=1e-3,
                        muon_weight_dimension_numbers=muon_lib.dimension_numbers)
  got, _ = jax.jit(ours.update)(grads, ours.init(params), params)
  want, _ = jax.jit(theirs.update)(grads, theirs.init(params), params)
  labels = muon_lib.labels(params)
  for label, a, b in zip(jax.tree.leaves(labels), jax.tree.leaves(got), jax.tree.leaves(want)):
    if label == "muon":
      np.testing.assert_array_equal(a, b)


def test_singular_values_lie_in_the_quintic_band():
  """The 5-fold quintic maps every normalised singular value in [0.01, 1] into
  [0.6818, 1.1344] (computed below); a Gaussian 64x256 gradient's (normalised: 0.06-0.19)
  come out of the optimizer in that band, and its singular vectors are the gradient's."""
  x = np.linspace(0.01, 1.0, 100001)
  for _ in range(5):
    x = COEFFS[0] * x + COEFFS[1] * x ** 3 + COEFFS[2] * x ** 5
  assert (round(x.min(), 4), round(x.max(), 4)) == (0.6818, 1.1344)

  g = np.random.default_rng(3).normal(size=(64, 256)).astype(np.float32)
  normalised = np.linalg.svd(g / np.linalg.norm(g), compute_uv=False)
  assert 0.01 < normalised.min() and normalised.max() <= 1
  params = {"blocks_0": {"mlp": {"fc": {"kernel": jnp.zeros((64, 256))}}}}
  optimizer = train_lib.make_optimizer(_train(), 1)
  updates, _ = jax.jit(optimizer.update)({"blocks_0": {"mlp": {"fc": {"kernel": g}}}},
                                optimizer.init(params), params)
  ortho = np.asarray(updates["blocks_0"]["mlp"]["fc"]["kernel"]) / (-0.02 * 2.0)  # sqrt(256/64)
  s = np.linalg.svd(ortho, compute_uv=False)
  assert 0.6818 - 1e-4 <= s.min() and s.max() <= 1.1344 + 1e-4, (s.min(), s.max())
  # Measured: 0.683 to 1.128 (the spread the speedrun's coefficients trade for speed).
  assert s.max() - s.min() > 0.3
  # In the gradient's singular bases the update is diagonal, each value the 5-fold quintic of
  # the gradient's normalised singular value.
  u_g, _, vt_g = np.linalg.svd(g.astype(np.float64), full_matrices=False)
  rotated = u_g.T @ ortho @ vt_g.T
  predicted = normalised
  for _ in range(5):
    predicted = COEFFS[0] * predicted + COEFFS[1] * predicted ** 3 + COEFFS[2] * predicted ** 5
  np.testing.assert_allclose(np.diag(rotated), predicted, atol=1e-4)
  assert np.abs(rotated - np.diag(np.diag(rotated))).max() < 1e-4


MUON_GPT = {"attn/qkv", "attn/out", "mlp/fc", "mlp/proj"}
MUON_LLAMA = {"attn/q", "attn/kv", "attn/out", "mlp/gate", "mlp/up", "mlp/proj"}


@pytest.mark.parametrize("preset, scan_layers, matrices", [
    ("gpt-nano", False, MUON_GPT), ("gpt-nano", True, MUON_GPT),
    ("llama-nano", False, MUON_LLAMA), ("llama-nano", True, MUON_LLAMA)])
def test_which_leaves_are_muons(preset, scan_layers, matrices):
  abstract = _abstract(preset, scan_layers)
  labels = muon_lib.labels(abstract)
  blocks = ["['blocks']"] if scan_layers else [f"['blocks_{i}']" for i in range(4)]
  want = sorted(f"{b}['{m.split('/')[0]}']['{m.split('/')[1]}']['kernel']"
                for b in blocks for m in matrices)
  assert _paths(labels, "muon") == want
  adam = _paths(labels, "adam")
  # Embeddings, the untied head, norms and biases: AdamW.
  assert "['wte']['embedding']" in adam and "['ln_f']['scale']" in adam
  assert ("['lm_head']['kernel']" in adam) == (preset == "llama-nano")
  assert ("['wpe']['embedding']" in adam) == (preset == "gpt-nano")
  dims = muon_lib.dimension_numbers(abstract)
  block = dims["blocks" if scan_layers else "blocks_0"]["attn"]
  if preset == "gpt-nano":
    assert block["qkv"]["kernel"] == contrib.MuonDimensionNumbers((-4,), (-2, -1))
    assert block["qkv"]["bias"] is None
  else:
    assert block["kv"]["kernel"] == contrib.MuonDimensionNumbers((-4,), (-2, -1))
  assert block["out"]["kernel"] == contrib.MuonDimensionNumbers((-3, -2), (-1,))


def _as_matrices(name, kernel):
  """A kernel as the list of matrices Muon orthogonalises: (stack..., in..., out...)."""
  if name in ("qkv", "kv"):  # (..., D, n, H, K): n matrices D x HK per stack entry
    x = np.moveaxis(kernel, -3, -4)
    return list(x.reshape(-1, x.shape[-3], x.shape[-2] * x.shape[-1]))
  if name == "q":
    return list(kernel.reshape(-1, kernel.shape[-3], kernel.shape[-2] * kernel.shape[-1]))
  if name == "out":
    return list(kernel.reshape(-1, kernel.shape[-3] * kernel.shape[-2], kernel.shape[-1]))
  return list(kernel.reshape(-1, *kernel.shape[-2:]))


@pytest.mark.parametrize("preset, scan_layers", [("gpt-nano", False), ("llama-nano", True)])
def test_a_kernels_update_is_newton_schulz_of_its_matrices(preset, scan_layers):
  """First step (its Nesterov momentum is a multiple of the gradient): every Muon kernel's
  update, 4-D qkv (D, 3, H, K) and kv, (H, K, D) out, scanned (L, ...) stacks, is -lr x width
  scale x NS of each of its matrices, q/k/v and layers apart; within 1e-5 of the update / lr."""
  abstract = _abstract(preset, scan_layers)
  params, grads = _random_like(abstract, 4), _random_like(abstract, 5)
  optimizer = train_lib.make_optimizer(_train(), 1)
  updates, _ = jax.jit(optimizer.update)(grads, optimizer.init(params), params)
  blocks = "blocks" if scan_layers else "blocks_0"
  checked = 0
  for path, label in jax.tree_util.tree_leaves_with_path(muon_lib.labels(params)):
    keys = [k.key for k in path]
    if label != "muon" or keys[0] != blocks:
      continue
    got = _as_matrices(keys[-2], np.asarray(_get(updates, keys)))
    grad = _as_matrices(keys[-2], np.asarray(_get(grads, keys)))
    assert len(got) == {"qkv": 3, "kv": 2}.get(keys[-2], 1) * (4 if scan_layers else 1)
    for u, g in zip(got, grad):
      scale = math.sqrt(max(1.0, g.shape[1] / g.shape[0]))
      np.testing.assert_allclose(u / 0.02, -scale * newton_schulz(g), atol=1e-5, rtol=0)
      checked += 1
  assert checked == (6 if preset == "gpt-nano" else 4 * (1 + 2 + 1 + 3))


def _get(tree, keys):
  for key in keys:
    tree = tree[key]
  return tree


def test_frozen_leaves_stay_and_hold_no_muon_state():
  """A trainable mask (LoRA's, train.trainable's): frozen leaves get zero updates and no
  state; the trained ones keep their Muon or AdamW update."""
  abstract = _abstract("gpt-micro")
  params, grads = _random_like(abstract, 6), _random_like(abstract, 7)
  trainable = jax.tree_util.tree_map_with_path(
      lambda path, _: jax.tree_util.keystr(path).startswith("['blocks_1']"), params)
  labels = muon_lib.labels(params, trainable)
  assert _paths(labels, "muon") == sorted(f"['blocks_1']{m}['kernel']" for m in (
      "['attn']['qkv']", "['attn']['out']", "['mlp']['fc']", "['mlp']['proj']"))
  assert "['blocks_0']['attn']['qkv']['kernel']" in _paths(labels, "freeze")
  optimizer = train_lib.make_optimizer(_train(grad_clip=1.0), 1, trainable)
  state = optimizer.init(params)
  updates, _ = jax.jit(optimizer.update)(grads, state, params)
  for label, u in zip(jax.tree.leaves(labels), jax.tree.leaves(updates)):
    assert (label == "freeze") == (not np.any(np.asarray(u)))
  muon_state = state[1].inner_states["muon"].inner_state[0]
  assert len(jax.tree.leaves(muon_state.mu)) == 4


def test_wsd_schedule_values():
  """Warmup from lr / 11 over 10 steps, the peak until step 80, then over the last 20% of 100
  steps down to min_learning_rate at step 100: linear, or 1-sqrt."""
  train = config_lib.default_config().train
  train.update(dict(schedule="wsd", warmup_steps=10, decay_fraction=0.2, learning_rate=1e-3,
                    min_learning_rate=1e-4))
  linear = train_lib.learning_rate_schedule(train, 100)
  want = {0: 1e-3 / 11, 5: 1e-3 / 11 + (1e-3 - 1e-3 / 11) / 2, 10: 1e-3, 50: 1e-3, 80: 1e-3,
          90: 5.5e-4, 99: 1e-4 + 0.9e-3 * 0.05, 100: 1e-4, 150: 1e-4}
  for step, value in want.items():
    assert float(linear(step)) == pytest.approx(value, rel=1e-6), step
  for step in (10, 50, 80):
    assert float(linear(step)) == np.float32(1e-3)  # the plateau exactly
  assert float(linear(100)) == np.float32(1e-4)
  train.decay_shape = "1-sqrt"
  root = train_lib.learning_rate_schedule(train, 100)
  want = {80: 1e-3, 84: 1e-3 - 0.9e-3 * math.sqrt(0.2), 85: 5.5e-4,
          96: 1e-3 - 0.9e-3 * math.sqrt(0.8), 100: 1e-4}
  for step, value in want.items():
    assert float(root(step)) == pytest.approx(value, rel=1e-6), step
  # train.decay_steps sets the horizon, as for cosine; decay_fraction 1: decay from the start.
  train.update(dict(decay_shape="linear", decay_steps=50, decay_fraction=1.0, warmup_steps=0))
  short = train_lib.learning_rate_schedule(train, 100)
  assert [float(short(s)) for s in (0, 25, 50, 99)] == pytest.approx(
      [1e-3, 5.5e-4, 1e-4, 1e-4], rel=1e-6)


def test_wsd_scales_muon_and_adam_alike():
  """A constant gradient: AdamW's step on a bias is -lr(t) (|m / sqrt(v)| = 1), Muon's on a
  matrix -lr(t) x muon_learning_rate / learning_rate x the same direction every step."""
  params = {"blocks_0": {"mlp": {"fc": {"kernel": jnp.zeros((8, 8)), "bias": jnp.zeros(8)}}}}
  grads = _random_like(params, 8)
  train = _train(schedule="wsd", warmup_steps=4, decay_fraction=0.5, min_learning_rate=0.0,
                 muon_momentum_warmup_steps=0)
  optimizer, schedule = train_lib.make_optimizer(train, 12), train_lib.learning_rate_schedule(
      train, 12)
  state, update = optimizer.init(params), jax.jit(optimizer.update)
  first = None
  for step in range(12):
    updates, state = update(grads, state, params)
    fc = updates["blocks_0"]["mlp"]["fc"]
    lr = float(schedule(step))
    np.testing.assert_allclose(fc["bias"], -lr * np.sign(grads["blocks_0"]["mlp"]["fc"]["bias"]),
                               rtol=1e-5)
    direction = np.asarray(fc["kernel"]) / (-lr * 20)
    first = direction if first is None else first
    np.testing.assert_allclose(direction, first, rtol=0, atol=1e-5)


@pytest.mark.parametrize("override, message", [
    ("train.optimizer=sgd", "train.optimizer must be adamw or muon, got 'sgd'"),
    ("train.schedule=linear", "train.schedule must be cosine, constant or wsd, got 'linear'"),
    ("train.decay_shape=cosine", "train.decay_shape must be linear or 1-sqrt, got 'cosine'"),
    ("train.decay_fraction=0.0", "train.decay_fraction must be in (0, 1], got 0.0"),
    ("train.decay_fraction=1.5", "train.decay_fraction must be in (0, 1], got 1.5"),
    ("train.muon_ns_steps=0", "train.muon_ns_steps must be at least 1, got 0"),
])
def test_unusable_values_are_one_line_errors(override, message):
  config = config_lib.default_config()
  config_lib.apply_overrides(config, [override])
  with pytest.raises(JaxllmError, match=re.escape(message)):
    config_lib.check_train(config.train)


def test_muon_momentum_and_learning_rate_are_checked():
  for overrides, message in (({"muon_momentum": 1.0}, "train.muon_momentum must be in [0, 1)"),
                             ({"learning_rate": 0.0}, "needs train.learning_rate > 0")):
    with pytest.raises(JaxllmError, match=re.escape(message)):
      config_lib.check_train(_train(**overrides))
  # adamw ignores the Muon keys.
  config_lib.check_train(_train(optimizer="adamw", muon_momentum=1.0))


def test_vectorised_trials_refuse_muon(tmp_path):
  config = config_lib.default_config()
  config.train.optimizer = "muon"
  with pytest.raises(JaxllmError, match="vectorised trials train with AdamW only"):
    vectorized.run(config, [{"train.learning_rate": 1e-3}], [tmp_path / "a"])


# The same 20 Muon steps (2 microbatches each, global-norm clipping) on one device and split
# over (1, 8, 1) and (1, 2, 4), in one process on 8 simulated devices (tests/sharding_helper.py's
# model, data and steps); Muon's momentum must be placed like its parameter.
MESH_RUNS = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, "tests")
    import sharding_helper as h  # sets the 8 devices before jax starts
    from jaxllm import config as config_lib
    from jaxllm.models.gpt import GPT
    from jaxllm.training import step as train_lib
    train = config_lib.default_config().train
    train.update(dict(optimizer="muon", learning_rate=3e-3, warmup_steps=0, schedule="constant",
                      muon_momentum_warmup_steps=10))
    opt = train_lib.make_optimizer(train, h.STEPS)
    model = GPT(h.CONFIG)
    params = h.initial_params(model)
    out = {"losses": {}, "layout": {}}
    for shape in [(1, 1, 1), (1, 8, 1), (1, 2, 4)]:
      losses, state, _ = h.train_losses(model, shape, params, opt)
      out["losses"][str(shape)] = losses
      muon = state.opt_state[1].inner_states["muon"].inner_state[0].mu
      out["layout"][str(shape)] = {"params": h.layout(state.params), "mu": h.layout(muon)}
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def mesh_runs():
  """Started when the module's first test asks for it, collected by the mesh test."""
  return subprocess.Popen([sys.executable, "-c", MESH_RUNS], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def test_resume_after_sigkill_is_exact(tmp_path, shared_data, compile_cache, mesh_runs):  # noqa: F811
  """A Muon run killed right after its step-8 checkpoint resumes to the uninterrupted run's
  every logged loss and final parameters, bit for bit (test_checkpoint.py's runner)."""
  corpus = tmp_path / "verdict.txt"
  corpus.write_text((shared_data / "the-verdict.txt").read_text())
  reference, killed = tmp_path / "reference", tmp_path / "killed"
  muon = ("--config.train.optimizer=muon", "--config.train.muon_momentum_warmup_steps=6",
          "--config.train.sample_tokens=0")
  runs = [_start(compile_cache, reference, corpus, *muon),
          _start(compile_cache, killed, corpus, *muon, kill_at=8, how="SIGKILL")]
  (status, _, err), (kill_status, _, _) = map(_finish, runs)
  assert (status, kill_status) == (0, -9), err[-3000:]
  assert _steps(killed) == [4, 8]
  status, out, err = _finish(_start(compile_cache, killed, corpus, *muon))
  assert status == 0, err[-3000:]
  assert "resuming from step 8" in out
  expected = _records(reference)
  assert [r["step"] for r in expected if "loss" in r] == [2, 4, 6, 8, 10, 12]
  assert _records(killed) == expected
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, _params(killed), _params(reference))))


def test_the_same_losses_on_three_meshes(mesh_runs):
  out, err = mesh_runs.communicate(timeout=600)
  assert mesh_runs.returncode == 0, err[-4000:]
  result = json.loads(out.strip().splitlines()[-1])
  losses = {name: np.array(values) for name, values in result["losses"].items()}
  one = losses["(1, 1, 1)"]
  assert one[-1] < one[0] - 0.5  # it learns (measured: see below)
  for name in ("(1, 8, 1)", "(1, 2, 4)"):
    assert np.abs(losses[name] - one).max() < 1e-4, (name, losses[name] - one)
    layout = result["layout"][name]
    for key, placed in layout["mu"].items():  # each Muon momentum split like its parameter
      assert placed["spec"] == layout["params"][key]["spec"], key
  assert layout["mu"]["blocks_0/attn/qkv/kernel"]["spec"] == [["fsdp"], [], ["tensor"], []]
