"""GPT-2 import (Hugging Face and OpenAI TF formats) and export, on small checkpoints made here."""

import json

import flax.linen as nn
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxllm import cli
from jaxllm import config as config_lib
from jaxllm.models.gpt import GPT, abstract_variables
from jaxllm.models.stacking import stack_layers
from jaxllm.training import rundir as run_io
from jaxllm.weights import convert

# A small GPT-2 with GPT-2's vocabulary, so GPT-2's tokenizer works with it.
HPARAMS = {"vocab_size": 50257, "context_length": 16, "d_model": 32, "n_head": 4, "n_layer": 2,
           "layer_norm_epsilon": 1e-5}
LAYER_SHAPES = {"ln_1.weight": (32,), "ln_1.bias": (32,), "attn.c_attn.weight": (32, 96),
                "attn.c_attn.bias": (96,), "attn.c_proj.weight": (32, 32),
                "attn.c_proj.bias": (32,), "ln_2.weight": (32,), "ln_2.bias": (32,),
                "mlp.c_fc.weight": (32, 128), "mlp.c_fc.bias": (128,),
                "mlp.c_proj.weight": (128, 32), "mlp.c_proj.bias": (32,)}


def _tensors(seed=0):
  """GPT-2 tensors in Hugging Face's names and shapes, random."""
  shapes = {"wte.weight": (50257, 32), "wpe.weight": (16, 32), "ln_f.weight": (32,),
            "ln_f.bias": (32,)}
  shapes.update({f"h.{i}.{name}": shape for i in range(2) for name, shape in LAYER_SHAPES.items()})
  rng = np.random.default_rng(seed)
  return {name: (0.1 * rng.standard_normal(shape)).astype(np.float32)
          for name, shape in shapes.items()}


def _leaves(params):
  return [np.asarray(x) for x in jax.tree.leaves(params)]


def _write_hf(folder, tensors, prefix="transformer.", **config_changes):
  folder.mkdir(parents=True, exist_ok=True)
  stored = {prefix + name: value for name, value in tensors.items()}
  # As in the hub's gpt2: each layer's causal-mask buffer, and the tied head.
  stored.update({f"{prefix}h.{i}.attn.bias": np.tril(np.ones((1, 1, 16, 16), np.float32))
                 for i in range(2)})
  stored["lm_head.weight"] = tensors["wte.weight"]
  save_file(stored, folder / "model.safetensors")
  config = {"model_type": "gpt2", "vocab_size": 50257, "n_positions": 16, "n_embd": 32,
            "n_head": 4, "n_layer": 2, "activation_function": "gelu_new",
            "layer_norm_epsilon": 1e-5, **config_changes}
  (folder / "config.json").write_text(json.dumps(config))
  return folder


def _openai_name(name):
  """h.0.attn.c_attn.weight -> model/h0/attn/c_attn/w; ln weights are g, embeddings bare."""
  parts = name.split(".")
  if parts[0] == "h":
    parts = [f"h{parts[1]}", *parts[2:]]
  if parts[-1] == "bias":
    parts[-1] = "b"
  elif parts[-2] in ("wte", "wpe"):
    parts = parts[:-1]
  else:
    parts[-1] = "g" if parts[-2].startswith("ln_") else "w"
  return "model/" + "/".join(parts)


def _write_openai_tf(folder, tensors):
  import tensorflow as tf

  folder.mkdir(parents=True, exist_ok=True)
  # OpenAI's Conv1D kernels are [1, in, out].
  variables = {_openai_name(name): value[None] if value.ndim == 2 and name.startswith("h.")
               else value for name, value in tensors.items()}
  tf.raw_ops.SaveV2(prefix=str(folder / "model.ckpt"), tensor_names=list(variables),
                    shape_and_slices=[""] * len(variables), tensors=list(variables.values()))
  (folder / "hparams.json").write_text(json.dumps(
      {"n_vocab": 50257, "n_ctx": 16, "n_embd": 32, "n_head": 4, "n_layer": 2}))
  return folder, tf.train.load_checkpoint(str(folder / "model.ckpt")).get_variable_to_shape_map()


def test_both_formats_import_to_the_same_params(tmp_path):
  tensors = _tensors()
  hf = _write_hf(tmp_path / "hf", tensors)
  tf_folder, stored = _write_openai_tf(tmp_path / "tf", tensors)
  assert stored["model/h1/attn/c_attn/w"] == [1, 32, 96]
  assert stored["model/h0/ln_1/g"] == [32] and stored["model/ln_f/b"] == [32]
  assert stored["model/wte"] == [50257, 32] and stored["model/wpe"] == [16, 32]

  convert.import_gpt2(hf, tmp_path / "from_hf")
  convert.import_gpt2(tf_folder, tmp_path / "from_tf")
  config, model, params, tokenizer = run_io.load_run(tmp_path / "from_hf")
  _, _, params_tf, _ = run_io.load_run(tmp_path / "from_tf")
  assert all(np.array_equal(a, b) for a, b in zip(_leaves(params), _leaves(params_tf)))
  assert (config.model.preset, config.model.vocab_size, tokenizer.name) == ("", 50257, "gpt2")
  assert (model.config.n_layer, model.config.n_head, model.config.d_model) == (2, 4, 32)

  # Meaning, not only shapes: head 2's key weights are columns D + 2K ... D + 3K of c_attn.
  qkv = np.asarray(params["blocks_1"]["attn"]["qkv"]["kernel"])
  assert qkv.shape == (32, 3, 4, 8)
  np.testing.assert_array_equal(qkv[:, 1, 2, :], tensors["h.1.attn.c_attn.weight"][:, 48:56])
  np.testing.assert_array_equal(np.asarray(params["blocks_1"]["attn"]["qkv"]["bias"])[2, 3],
                                tensors["h.1.attn.c_attn.bias"][88:96])
  out = np.asarray(params["blocks_0"]["attn"]["out"]["kernel"])  # (H, K, D): rows h*K + k
  np.testing.assert_array_equal(out[3, 5], tensors["h.0.attn.c_proj.weight"][29])
  np.testing.assert_array_equal(np.asarray(params["ln_f"]["scale"]), tensors["ln_f.weight"])
  np.testing.assert_array_equal(np.asarray(params["wte"]["embedding"]), tensors["wte.weight"])


def test_export_then_import_round_trip(tmp_path, capsys):
  tensors = _tensors(seed=1)
  assert cli.main(["convert", "--from", str(_write_hf(tmp_path / "hf", tensors, prefix="")),
                   "--out", str(tmp_path / "run")]) == 0
  assert "2 layers, 4 heads, d_model 32, context 16, vocab 50257" in capsys.readouterr().out

  def export(run, out):  # `jaxllm convert --to hf`: the tensors it started from
    assert cli.main(["convert", "--from", str(run), "--to", "hf", "--out", str(out)]) == 0
    capsys.readouterr()
    exported = load_file(out / "model.safetensors")
    assert sorted(exported) == sorted(tensors)
    assert all(np.array_equal(exported[name], tensors[name]) for name in tensors)

  export(tmp_path / "run", tmp_path / "exported")
  config = json.loads((tmp_path / "exported" / "config.json").read_text())
  assert (config["n_embd"], config["n_layer"], config["n_positions"]) == (32, 2, 16)
  assert config["activation_function"] == "gelu_new" and config["eos_token_id"] == 50256

  convert.import_gpt2(tmp_path / "exported", tmp_path / "again")
  first, again = (run_io.load_run(tmp_path / d)[2] for d in ("run", "again"))
  assert all(np.array_equal(a, b) for a, b in zip(_leaves(first), _leaves(again)))

  # A model.scan_layers run (stacked blocks) exports the same files, its layers unstacked.
  config = run_io.load_run(tmp_path / "run")[0]
  config.model.scan_layers = True
  run_io.write_run(tmp_path / "scanned", config, stack_layers(first, 2))
  export(tmp_path / "scanned", tmp_path / "from_scanned")

  # `jaxllm generate` reads the converted run: greedy decoding = argmax of its logits.
  assert cli.main(["generate", "--workdir", str(tmp_path / "run"), "--prompt", "Hello",
                   "--max-new-tokens", "4", "--temperature", "0"]) == 0
  _, model, params, tokenizer = run_io.load_run(tmp_path / "run")
  ids = tokenizer.encode("Hello")
  logits = jax.jit(lambda tokens: model.apply({"params": params}, tokens))
  for _ in range(4):  # causal: padding after the last real token changes nothing before it
    padded = np.array([ids + [0] * (16 - len(ids))])
    ids.append(int(np.argmax(logits(padded)[0, len(ids) - 1])))
  assert capsys.readouterr().out == tokenizer.decode(ids) + "\n"


def test_logits_match_transformers(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  hf_config = transformers.GPT2Config(vocab_size=50257, n_positions=16, n_embd=32, n_layer=2,
                                      n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
  reference = transformers.GPT2LMHeadModel(hf_config).eval()
  with torch.no_grad():  # its init leaves biases at 0 and LayerNorms at 1: perturb them all
    for parameter in reference.parameters():
      parameter.add_(0.05 * torch.randn_like(parameter))
  reference.save_pretrained(tmp_path / "hf", safe_serialization=True)

  convert.import_gpt2(tmp_path / "hf", tmp_path / "run")
  _, model, params, _ = run_io.load_run(tmp_path / "run")
  tokens_BxL = np.random.default_rng(0).integers(0, 50257, size=(3, 16))
  logits_BxLxV = np.asarray(model.apply({"params": params}, tokens_BxL))
  with torch.no_grad():
    expected_BxLxV = reference(torch.tensor(tokens_BxL)).logits.numpy()
  max_abs_diff = float(np.abs(logits_BxLxV - expected_BxLxV).max())
  print(f"max abs logit difference, jaxllm vs transformers GPT2LMHeadModel: {max_abs_diff:.2e}")
  assert max_abs_diff <= 1e-4
  assert np.abs(expected_BxLxV).max() > 0.5  # the logits are not trivially small

  # And back: transformers loads the export and agrees as closely.
  convert.export_hf(tmp_path / "run", tmp_path / "exported")
  exported = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "exported").eval()
  with torch.no_grad():
    exported_BxLxV = exported(torch.tensor(tokens_BxL)).logits.numpy()
  assert float(np.abs(logits_BxLxV - exported_BxLxV).max()) <= 1e-4


def _error(capsys, *argv):
  assert cli.main(["convert", *argv]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("jaxllm: error: "), err
  return err[0]


def test_missing_and_broken_files_are_one_line_errors(tmp_path, capsys):
  tensors = _tensors()
  out = str(tmp_path / "out")

  hf = _write_hf(tmp_path / "hf", tensors)
  (hf / "config.json").unlink()
  assert "config.json not found" in _error(capsys, "--from", str(hf), "--out", out)

  tf_folder, _ = _write_openai_tf(tmp_path / "tf", tensors)
  (tf_folder / "hparams.json").unlink()
  assert "hparams.json not found" in _error(capsys, "--from", str(tf_folder), "--out", out)

  truncated = _write_hf(tmp_path / "truncated", tensors)
  data = (truncated / "model.safetensors").read_bytes()
  (truncated / "model.safetensors").write_bytes(data[:len(data) // 2])
  assert "model.safetensors cannot be read" in _error(capsys, "--from", str(truncated),
                                                       "--out", out)

  wider = _write_hf(tmp_path / "wider", tensors, n_embd=64)
  message = _error(capsys, "--from", str(wider), "--out", out)
  assert "'wte.weight' has shape [50257, 32] but " in message
  assert "config.json implies [50257, 64]" in message

  deeper = _write_hf(tmp_path / "deeper", tensors, n_layer=3)
  assert "lacks 'h.2.ln_1.weight'" in _error(capsys, "--from", str(deeper), "--out", out)

  pickled = tmp_path / "pickled"
  pickled.mkdir()
  (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
  assert "never loads" in _error(capsys, "--from", str(pickled), "--out", out)
  assert not (tmp_path / "out").exists()


def test_missing_config_keys_are_one_line_errors(tmp_path, capsys):
  out = str(tmp_path / "out")
  hf = _write_hf(tmp_path / "hf", _tensors())
  config = json.loads((hf / "config.json").read_text())
  del config["n_embd"]
  (hf / "config.json").write_text(json.dumps(config))
  message = _error(capsys, "--from", str(hf), "--out", out)
  assert f"{hf / 'config.json'} lacks 'n_embd'" in message and "copy config.json again" in message

  tf_folder = tmp_path / "tf"  # hparams.json is read before the checkpoint
  tf_folder.mkdir()
  (tf_folder / "hparams.json").write_text(json.dumps({"n_vocab": 50257, "n_ctx": 16,
                                                      "n_head": 4, "n_layer": 2}))
  assert f"{tf_folder / 'hparams.json'} lacks 'n_embd'" in _error(
      capsys, "--from", str(tf_folder), "--out", out)


def test_unexpected_tensors_are_named_a_few_then_counted(tmp_path, capsys):
  tensors = _tensors()
  # The buffers the hub's files hold beside the weights are not unexpected.
  buffers = {f"h.{i}.attn.masked_bias": np.full((), -1e4, np.float32) for i in range(2)}
  hf = _write_hf(tmp_path / "buffers", {**tensors, **buffers})
  assert cli.main(["convert", "--from", str(hf), "--out", str(tmp_path / "run")]) == 0
  capsys.readouterr()

  extra = {f"score.{i}.weight": np.zeros((2, 32), np.float32) for i in range(5)}
  hf = _write_hf(tmp_path / "extra", {**tensors, **extra})
  message = _error(capsys, "--from", str(hf), "--out", str(tmp_path / "out"))
  assert (f"{hf / 'model.safetensors'} holds 5 tensors that GPT-2 has not ('score.0.weight', "
          f"'score.1.weight', 'score.2.weight' and 2 more)") in message


def test_download_checks_what_it_fetched(tmp_path, monkeypatch, capsys):
  """A name is fetched over HTTPS (here a file:// stand-in) and checked against its size."""
  hub = tmp_path / "hub" / "gpt2"
  _write_hf(hub, _tensors())  # 2 layers: not the real gpt2's 12
  monkeypatch.setattr(convert, "HF_URL", (tmp_path / "hub").as_uri() + "/{name}/{file}")
  message = _error(capsys, "--from", "gpt2", "--out", str(tmp_path / "out"),
                   "--cache-dir", str(tmp_path / "cache"))
  assert "describes {'n_layer': 2, 'n_head': 4, 'd_model': 32, 'context_length': 16}" in message
  assert "not gpt2's {'n_layer': 12" in message
  cached = tmp_path / "cache" / "gpt2" / "model.safetensors"
  assert cached.read_bytes() == (hub / "model.safetensors").read_bytes()


@pytest.mark.parametrize("name, n_params", [
    ("gpt2", 124_439_808), ("gpt2-medium", 354_823_168), ("gpt2-large", 774_030_080),
    ("gpt2-xl", 1_557_611_200)])
def test_every_gpt2_size_maps_onto_its_preset(name, n_params):
  """OpenAI's parameter counts; every GPT-2 tensor lands on a jaxllm parameter of its size."""
  preset = config_lib.PRESETS[convert.GPT2_NAMES[name]]
  hparams = {**preset, "vocab_size": 50257, "layer_norm_epsilon": 1e-5}
  config = convert.run_config(hparams)
  assert config.model.preset == convert.GPT2_NAMES[name]
  target = nn.unbox(abstract_variables(GPT(config_lib.model_config(config.model)))["params"])
  table = convert.tensor_table(hparams)
  assert len(table) == 4 + 12 * preset["n_layer"] == len(jax.tree.leaves(target))
  for path, shape in table.values():
    leaf = target
    for key in path:
      leaf = leaf[key]
    assert np.prod(leaf.shape) == np.prod(shape)
  assert sum(int(np.prod(shape)) for _, shape in table.values()) == n_params
