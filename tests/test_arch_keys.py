"""The GPT-2 speedrun's architecture keys (model.mlp=relu2, zero_init_proj, logit_softcap,
x0_shortcut, value_residual): each computes what its formula says, the shortcuts at their
init are the plain model, KV-cached generation matches the full forward, training runs with
all of them (and train.target_val_loss records when it is reached), and Hugging Face export
refuses what it cannot express in one line."""

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import cli
from jaxllm import config as config_lib
from jaxllm.errors import JaxllmError
from jaxllm.models import layers
from jaxllm.models.gpt import GPT, Block, CausalSelfAttention, init_cache, init_params, logical_axes
from jaxllm.serve import generate as generate_lib
from jaxllm.training import loop as trainer
from jaxllm.training import rundir as run_io
from jaxllm.weights import common, convert

TINY = dict(n_layer=2, n_head=4, d_model=32, context_length=16, vocab_size=50)
LLAMA = dict(norm="rmsnorm", position="rope", mlp_hidden=64, bias=False, n_kv_head=2,
             qk_norm=True)
ALL_KEYS = dict(mlp="relu2", zero_init_proj=True, logit_softcap=3.0, x0_shortcut=True,
                value_residual=True, tie_embeddings=False)
SCALARS = ("x_scale", "x0_scale", "v_scale", "v_first_scale")


def _config(**keys):
  config = config_lib.default_config()
  for key, value in {**TINY, **keys}.items():
    config.model[key] = value
  return config


def _cfg(**keys):
  return config_lib.model_config(_config(**keys).model)


def _tokens(shape=(2, 16), seed=1):
  return jax.random.randint(jax.random.key(seed), shape, 0, TINY["vocab_size"])


def _init(module, *args):
  return nn.unbox(module.init(jax.random.key(2), *args)["params"])


def _perturbed(params, seed=0):
  """Every parameter moved off its init (zero kernels and 1/0 scalars included)."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([x + 0.3 * jax.random.normal(k, x.shape, x.dtype)
                            for x, k in zip(leaves, keys)])


def test_relu2_mlp_is_proj_of_squared_relu():
  cfg = _cfg(mlp="relu2")
  mlp = layers.MLP(cfg)
  x = np.asarray(jax.random.normal(jax.random.key(0), (2, 5, 32)))
  params = _perturbed(_init(mlp, x))
  out = mlp.apply({"params": params}, x)
  fc, proj = (jax.tree.map(np.asarray, params[name]) for name in ("fc", "proj"))
  hidden = np.maximum(x @ fc["kernel"] + fc["bias"], 0.0) ** 2
  np.testing.assert_allclose(out, hidden @ proj["kernel"] + proj["bias"], rtol=1e-5, atol=1e-5)
  # Same parameters as the GELU MLP's: checkpoints and LoRA see the same fc/proj.
  assert jax.tree.map(np.shape, params) == jax.tree.map(
      np.shape, _init(layers.MLP(_cfg()), x))


def test_logit_softcap_is_c_tanh_of_raw_logits():
  """|logits| <= C (< C but for float32's tanh rounding to 1 far past the cap)."""
  plain, capped = GPT(_cfg()), GPT(_cfg(logit_softcap=2.0))
  params = _perturbed(init_params(plain, jax.random.key(0)))
  raw = plain.apply({"params": params}, _tokens())
  soft = capped.apply({"params": params}, _tokens())
  assert float(jnp.mean(jnp.abs(raw) > 2.0)) > 0.2  # many past the cap: tanh bends them
  assert float(jnp.abs(soft).max()) <= 2.0
  assert float(jnp.abs(soft[jnp.abs(raw) < 10.0]).max()) < 2.0
  np.testing.assert_allclose(soft, 2.0 * np.tanh(np.asarray(raw) / 2.0), rtol=1e-6, atol=1e-6)


def test_zero_init_proj_zeroes_outputs_and_head():
  model = GPT(_cfg(zero_init_proj=True, tie_embeddings=False))
  params = init_params(model, jax.random.key(0))
  for i in range(2):
    block = params[f"blocks_{i}"]
    assert not np.any(block["attn"]["out"]["kernel"]) and not np.any(block["mlp"]["proj"]["kernel"])
    assert np.any(block["attn"]["qkv"]["kernel"]) and np.any(block["mlp"]["fc"]["kernel"])
  assert not np.any(params["lm_head"]["kernel"]) and np.any(params["wte"]["embedding"])
  assert not np.any(model.apply({"params": params}, _tokens()))  # logits all exactly 0
  # A tied head is the token embedding: it keeps its init (only the projections start at 0).
  tied = init_params(GPT(_cfg(zero_init_proj=True)), jax.random.key(0))
  assert np.any(tied["wte"]["embedding"]) and not np.any(tied["blocks_0"]["attn"]["out"]["kernel"])


@pytest.mark.parametrize("scan", [False, True])
def test_shortcuts_at_init_are_the_plain_model(scan):
  """lambda = a = 1, mu = b = 0: x and v pass unchanged, so the logits are the plain model's
  on the same (other) parameters, bit for bit; their scalars are replicated, 'layers' scanned."""
  keyed = GPT(_cfg(x0_shortcut=True, value_residual=True, scan_layers=scan))
  params = init_params(keyed, jax.random.key(0))
  blocks = params["blocks"] if scan else params["blocks_1"]
  assert [float(np.mean(blocks[n] if n.startswith("x") else blocks["attn"][n]))
          for n in SCALARS] == [1.0, 0.0, 1.0, 0.0]
  spec = logical_axes(keyed)["blocks" if scan else "blocks_0"]
  assert tuple(spec["x0_scale"]) == (("layers",) if scan else ())
  assert tuple(spec["attn"]["v_first_scale"]) == (("layers",) if scan else ())

  def strip(tree):
    return {k: strip(v) if isinstance(v, dict) else v for k, v in tree.items() if k not in SCALARS}

  plain = GPT(_cfg(scan_layers=scan))
  assert jax.tree.map(np.shape, strip(params)) == jax.tree.map(
      np.shape, init_params(plain, jax.random.key(0)))
  np.testing.assert_array_equal(keyed.apply({"params": params}, _tokens()),
                                plain.apply({"params": strip(params)}, _tokens()))


def test_x0_shortcut_mixes_each_block_input():
  """A block with (lambda, mu) on (x, x0) is the plain block on lambda x + mu x0."""
  keyed, plain = Block(_cfg(x0_shortcut=True)), Block(_cfg())
  x, x0 = (jax.random.normal(jax.random.key(i), (2, 8, 32)) for i in (0, 1))
  positions = jnp.broadcast_to(jnp.arange(8), (2, 8))
  params = _perturbed(_init(keyed, (x, None), positions, None, True, x0))
  (out, _), _ = keyed.apply({"params": params}, (x, None), positions, None, True, x0)
  lam, mu = float(params["x_scale"]), float(params["x0_scale"])
  assert abs(lam - 1) > 0.01 and abs(mu) > 0.01
  rest = {k: v for k, v in params.items() if k not in SCALARS}
  (want, _), _ = plain.apply({"params": rest}, (lam * x + mu * x0, None), positions, None, True)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_value_residual_against_numpy_attention():
  """out = proj(softmax(q k^T / sqrt(K), causal) (a v + b v_first)); layer 0's v_first is its
  own v (raw), which it hands on."""
  cfg = _cfg(value_residual=True)
  attn = CausalSelfAttention(cfg)
  x, v_first = (jax.random.normal(jax.random.key(i), shape) for i, shape in
                ((0, (2, 8, 32)), (1, (2, 8, 4, 8))))
  positions = jnp.broadcast_to(jnp.arange(8), (2, 8))
  params = _perturbed(_init(attn, x, positions, None, v_first, 1))
  out, _, handed = attn.apply({"params": params}, x, positions, None, v_first, 1)
  p = jax.tree.map(np.asarray, params)
  qkv = np.einsum("bld,dthk->blthk", np.asarray(x), p["qkv"]["kernel"]) + p["qkv"]["bias"]
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  mixed = p["v_scale"] * v + p["v_first_scale"] * np.asarray(v_first)
  scores = np.einsum("blhk,bshk->bhls", q, k) / math.sqrt(8)
  scores = np.where(np.tril(np.ones((8, 8), bool)), scores, -np.inf)
  weights = np.exp(scores - scores.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  heads = np.einsum("bhls,bshk->blhk", weights, mixed)
  want = np.einsum("blhk,hkd->bld", heads, p["out"]["kernel"]) + p["out"]["bias"]
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(handed, v_first)  # later layers pass v_first on
  _, _, first = attn.apply({"params": params}, x, positions, None, None, 0)
  np.testing.assert_allclose(first, v, rtol=1e-5, atol=1e-6)  # layer 0: its raw values


@pytest.mark.parametrize("layout", ["gpt2", "llama_scan"])
def test_kv_cached_generation_matches_full_forward(layout):
  keys = dict(ALL_KEYS) if layout == "gpt2" else dict(ALL_KEYS, **LLAMA, scan_layers=True)
  model = GPT(_cfg(**dict(keys, logit_softcap=0.5)))
  params = _perturbed(init_params(model, jax.random.key(0)))
  prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
  cached = generate_lib.generate(model, params, prompts, 8, temperature=0.0)
  assert cached == generate_lib.generate_uncached(model, params, prompts, 8, temperature=0.0)
  # Logits too: prompt then one token at a time through the cache = one full forward.
  tokens = _tokens()
  full = model.apply({"params": params}, tokens)
  cache = init_cache(model.config, 2)
  hidden, cache = model.apply({"params": params}, tokens[:, :9], cache=cache, method=GPT.encode)
  steps = [model.apply({"params": params}, hidden, method=GPT.logits)]
  for t in range(9, 16):
    hidden, cache = model.apply({"params": params}, tokens[:, t:t + 1], cache=cache,
                                positions_BxL=jnp.full((2, 1), t), method=GPT.encode)
    steps.append(model.apply({"params": params}, hidden, method=GPT.logits))
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5)


def test_config_checks():
  assert _cfg(**ALL_KEYS).mlp == "relu2"
  with pytest.raises(JaxllmError, match="model.logit_softcap must be >= 0"):
    _cfg(logit_softcap=-1.0)
  with pytest.raises(JaxllmError, match="model.mlp must be one of gelu, swiglu, relu2"):
    _cfg(mlp="relu3")
  encoder = _config(architecture="bert", x0_shortcut=True, vocab_size=None)
  with pytest.raises(JaxllmError, match="model.x0_shortcut=True applies to GPT decoders"):
    config_lib.resolve(encoder.model, 50)


@pytest.mark.parametrize("keys, refused", [
    (dict(mlp="relu2"), "model.mlp=relu2 cannot be exported to Hugging Face GPT-2"),
    (dict(mlp="relu2", **LLAMA, tie_embeddings=False),
     "model.mlp=relu2 cannot be exported to Hugging Face Llama"),
    (dict(logit_softcap=30.0), "model.logit_softcap=30.0 cannot be exported"),
    (dict(x0_shortcut=True), "model.x0_shortcut=true cannot be exported"),
    (dict(value_residual=True, scan_layers=True), "model.value_residual=true cannot be exported"),
])
def test_export_refuses_what_hugging_face_cannot_express(keys, refused):
  with pytest.raises(JaxllmError) as error:
    common.check_hf_expressible(_cfg(**keys), "run")
  message = str(error.value)
  assert refused in message and "\n" not in message and "to export" in message
  common.check_hf_expressible(_cfg(zero_init_proj=True, **LLAMA, mlp="swiglu"), "run")


def test_export_command_refuses_in_one_line(tmp_path, capsys):
  config = _config(x0_shortcut=True)
  params = init_params(GPT(config_lib.model_config(config.model)), jax.random.key(0))
  run_io.write_run(tmp_path / "run", config, params, {"kind": "char", "chars": "abc"})
  assert cli.main(["convert", "--from", str(tmp_path / "run"), "--to", "hf", "--out",
                   str(tmp_path / "hf")]) != 0
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "model.x0_shortcut=true cannot be exported" in err[0], err
  assert not (tmp_path / "hf").exists()


def test_zero_init_exports(tmp_path):
  config = _config(zero_init_proj=True)
  params = init_params(GPT(config_lib.model_config(config.model)), jax.random.key(0))
  run_io.write_run(tmp_path / "run", config, params, {"kind": "char", "chars": "abc"})
  convert.export_hf(tmp_path / "run", tmp_path / "hf")
  assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "gpt2"


def test_training_with_every_key_records_steps_to_target(tmp_path, shared_data, capsys):
  """Scanned layers, all keys on: the loss falls, the scalars learn, and the first evaluation
  at train.target_val_loss is in metrics.jsonl, eval.json and the printout. Zero-initialised
  head: the initial validation loss is exactly ln(vocabulary)."""
  config = _config(**ALL_KEYS, scan_layers=True, n_layer=2, vocab_size=None)
  config_lib.apply_overrides(config, [
      "data.dataset=text", "data.tokenizer=char", f"data.path={shared_data / 'the-verdict.txt'}",
      "train.steps=12", "train.batch_size=4", "train.schedule=constant", "train.warmup_steps=0",
      "train.learning_rate=1e-2", "train.log_every=2", "train.eval_every=2",
      "train.eval_batches=1", "train.peak_flops=1e11", "train.sample_tokens=0",
      "checkpoint.every_steps=0", "train.target_val_loss=3.4"])
  figures = trainer.run(config, tmp_path / "run", progress=False)
  records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
  evals = [r for r in records if "val_loss" in r]
  _, model, params, _ = run_io.load_run(tmp_path / "run")
  assert evals[0]["val_loss"] == pytest.approx(math.log(model.config.vocab_size), rel=1e-6)
  assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5
  first = next(r for r in evals if r["val_loss"] <= 3.4)
  assert 0 < first["step"] < 12 and [r for r in records if "target_step" in r] == [first]
  assert first["target_step"] == first["step"]
  assert first["target_tokens"] == first["step"] * 4 * 16
  assert first["target_seconds"] > 0
  assert (figures["steps_to_target"], figures["tokens_to_target"]) == (
      first["step"], first["target_tokens"])
  assert figures["seconds_to_target"] == first["target_seconds"]
  assert figures["target_val_loss"] == 3.4
  out = capsys.readouterr().out
  assert f"val loss reached train.target_val_loss 3.4 at step {first['step']}" in out
  learned = [np.asarray(params["blocks"]["x0_scale"]),
             np.asarray(params["blocks"]["attn"]["v_first_scale"])]
  assert all(np.all(x != 0) for x in learned)  # the shortcuts opened from 0


def test_target_never_reached_is_none_in_eval_json():
  run = trainer.Progress(writer=None, meter=None, last_eval={})
  train = config_lib.default_config().train
  assert trainer._target_summary(train, run) == {}  # off: eval.json as before
  train.target_val_loss = 1.5
  summary = {"steps": 30, **trainer._target_summary(train, run)}
  assert summary == {"steps": 30, "target_val_loss": 1.5, "steps_to_target": None,
                     "tokens_to_target": None, "seconds_to_target": None}
  assert trainer._target_text(summary) == (
      "val loss never reached train.target_val_loss 1.5 in 30 steps")
