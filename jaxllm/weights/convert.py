"""GPT-2 weights in and out: OpenAI's checkpoints as jaxllm run directories, and back.
(Llama-family checkpoints: jaxllm/weights/llama.py, BERT encoders: jaxllm/weights/bert.py;
`import_checkpoint` and `export_hf` take any of them.)

Reads the two formats OpenAI's GPT-2 is found in, and never unpickles anything:

- a Hugging Face folder (`gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl`): model.safetensors +
  config.json; tensors named like `h.0.attn.c_attn.weight` (Conv1D, so [in, out]), perhaps
  under `transformer.`;
- OpenAI's original TensorFlow checkpoint: model.ckpt.{index,data-*} + hparams.json; variables
  named like `model/h0/attn/c_attn/w` ([1, in, out]), read with `tf.train.load_checkpoint`.

Both become one dict of GPT-2 tensors in Hugging Face's names and shapes, checked against the
shapes the hyperparameters imply, and then jaxllm's params. Every jaxllm parameter is a
reshape of one GPT-2 tensor: the qkv kernel (D, 3, H, K) of c_attn [D, 3D], the attention
output kernel (H, K, D) of c_proj [D, D], the qkv bias (3, H, K) of c_attn's [3D]. GPT-2's
biases everywhere, tied embeddings, tanh GELU and LayerNorm epsilon 1e-5 are jaxllm's defaults.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import re
import shutil
import urllib.request
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from jaxllm import config as config_lib
from jaxllm.errors import JaxllmError
from jaxllm.models import stacking
from jaxllm.models.gpt import GPT, abstract_variables
from jaxllm.training import checkpoint as checkpoint_lib
from jaxllm.training import rundir as run_io
from jaxllm.weights import bert as bert_weights
from jaxllm.weights import common
from jaxllm.weights import llama as llama_weights

# Hugging Face model names -> jaxllm presets (the same sizes).
GPT2_NAMES = {"gpt2": "gpt2-small", "gpt2-medium": "gpt2-medium", "gpt2-large": "gpt2-large",
              "gpt2-xl": "gpt2-xl"}
HF_URL = "https://huggingface.co/{name}/resolve/main/{file}"
GPT2_VOCAB_SIZE = 50257

# GPT-2 tensor name -> (jaxllm path, shape in terms of D = d_model). Layer tensors are under
# h.<i>. in GPT-2 and blocks_<i> in jaxllm.
_TOP = {
    "wte.weight": (("wte", "embedding"), None),  # [vocab, D]
    "wpe.weight": (("wpe", "embedding"), None),  # [context, D]
    "ln_f.weight": (("ln_f", "scale"), lambda d: (d,)),
    "ln_f.bias": (("ln_f", "bias"), lambda d: (d,)),
}
_LAYER = {
    "ln_1.weight": (("ln_1", "scale"), lambda d: (d,)),
    "ln_1.bias": (("ln_1", "bias"), lambda d: (d,)),
    "attn.c_attn.weight": (("attn", "qkv", "kernel"), lambda d: (d, 3 * d)),
    "attn.c_attn.bias": (("attn", "qkv", "bias"), lambda d: (3 * d,)),
    "attn.c_proj.weight": (("attn", "out", "kernel"), lambda d: (d, d)),
    "attn.c_proj.bias": (("attn", "out", "bias"), lambda d: (d,)),
    "ln_2.weight": (("ln_2", "scale"), lambda d: (d,)),
    "ln_2.bias": (("ln_2", "bias"), lambda d: (d,)),
    "mlp.c_fc.weight": (("mlp", "fc", "kernel"), lambda d: (d, 4 * d)),
    "mlp.c_fc.bias": (("mlp", "fc", "bias"), lambda d: (4 * d,)),
    "mlp.c_proj.weight": (("mlp", "proj", "kernel"), lambda d: (4 * d, d)),
    "mlp.c_proj.bias": (("mlp", "proj", "bias"), lambda d: (d,)),
}
# Hugging Face checkpoints also hold each layer's causal-mask buffers: not weights.
_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)$")


def tensor_table(hparams: dict) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
  """Every GPT-2 tensor name -> (jaxllm path, GPT-2 shape) for these hyperparameters."""
  d = hparams["d_model"]
  shapes = {"wte.weight": (hparams["vocab_size"], d), "wpe.weight": (hparams["context_length"], d)}
  table = {name: (path, shapes.get(name) or shape(d)) for name, (path, shape) in _TOP.items()}
  for i in range(hparams["n_layer"]):
    for name, (path, shape) in _LAYER.items():
      table[f"h.{i}.{name}"] = ((f"blocks_{i}", *path), shape(d))
  return table


def read_hf(folder: pathlib.Path) -> tuple[dict, dict[str, np.ndarray]]:
  """(hyperparameters, tensors) of a Hugging Face GPT-2 folder."""
  from safetensors import SafetensorError
  from safetensors.numpy import load_file

  config = common.read_json(folder / "config.json", "a Hugging Face GPT-2 folder holds config.json "
                      "beside model.safetensors; copy it from the model's page")
  model_type = config.get("model_type", "gpt2")
  if model_type == "bert":
    raise JaxllmError(f"{folder} is a BERT (encoder) folder, not GPT-2: import it with "
                      f"`jaxllm convert --from {folder}` (an encoder run), not as a GPT")
  if model_type != "gpt2":
    raise JaxllmError(f"{folder / 'config.json'}: model_type '{model_type}' is not one jaxllm "
                      f"converts (gpt2, llama, qwen2, mistral)")
  activation = config.get("activation_function", "gelu_new")
  if activation not in ("gelu_new", "gelu_pytorch_tanh"):
    raise JaxllmError(f"{folder / 'config.json'}: activation_function '{activation}' is not "
                      f"GPT-2's tanh GELU (gelu_new), which jaxllm computes")
  common.required(config, ("n_embd", "n_head", "n_layer", "vocab_size"), folder / "config.json")
  if "n_positions" not in config and "n_ctx" not in config:
    common.required(config, ("n_positions",), folder / "config.json")
  d_model = int(config["n_embd"])
  if config.get("n_inner") not in (None, 4 * d_model):
    raise JaxllmError(f"{folder / 'config.json'}: n_inner {config['n_inner']} is not 4 * n_embd, "
                      f"the MLP width jaxllm builds")
  hparams = {"vocab_size": int(config["vocab_size"]),
             "context_length": int(config.get("n_positions") or config["n_ctx"]),
             "d_model": d_model, "n_head": int(config["n_head"]), "n_layer": int(config["n_layer"]),
             "layer_norm_epsilon": float(config.get("layer_norm_epsilon", 1e-5))}
  try:
    raw = load_file(folder / "model.safetensors")
  except (SafetensorError, OSError) as e:
    raise JaxllmError(f"{folder / 'model.safetensors'} cannot be read ({e}); download it "
                      f"again") from e
  tensors = {name.removeprefix("transformer."): value for name, value in raw.items()}
  head = tensors.pop("lm_head.weight", None)
  if head is not None and not np.array_equal(head, tensors.get("wte.weight")):
    raise JaxllmError(f"{folder}: lm_head.weight differs from wte.weight; GPT-2 ties them and "
                      f"so does this import")
  return hparams, {k: v for k, v in tensors.items() if not _BUFFER.match(k)}


def read_openai_tf(folder: pathlib.Path) -> tuple[dict, dict[str, np.ndarray]]:
  """(hyperparameters, tensors in Hugging Face's names and shapes) of OpenAI's TF checkpoint."""
  hparams_json = common.read_json(folder / "hparams.json", "OpenAI's GPT-2 folder holds hparams.json "
                            "beside model.ckpt.*; download it with the checkpoint")
  common.required(hparams_json, ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer"),
           folder / "hparams.json")
  hparams = {"vocab_size": int(hparams_json["n_vocab"]),
             "context_length": int(hparams_json["n_ctx"]), "d_model": int(hparams_json["n_embd"]),
             "n_head": int(hparams_json["n_head"]), "n_layer": int(hparams_json["n_layer"]),
             "layer_norm_epsilon": 1e-5}
  import tensorflow as tf  # deferred: only this format needs it

  prefix = tf.train.latest_checkpoint(str(folder)) or str(folder / "model.ckpt")
  try:
    reader = tf.train.load_checkpoint(prefix)
  except (tf.errors.OpError, ValueError) as e:
    raise JaxllmError(f"{prefix} cannot be read as a TensorFlow checkpoint "
                      f"({checkpoint_lib.first_line(e)}); download model.ckpt.* again") from e
  tensors = {}
  for name in reader.get_variable_to_shape_map():
    parts = name.split("/")  # model/h0/attn/c_attn/w, model/ln_f/g, model/wte
    if parts[0] != "model":
      continue  # e.g. global_step
    parts = parts[1:]
    if re.fullmatch(r"h\d+", parts[0]):
      parts[0] = f"h.{parts[0][1:]}"
    if parts[-1] in ("w", "g", "b"):
      parts[-1] = "bias" if parts[-1] == "b" else "weight"
    else:
      parts.append("weight")  # the embeddings
    value = reader.get_tensor(name)
    # Their Conv1D kernels carry a leading axis of 1: [1, in, out].
    tensors[".".join(parts)] = value[0] if value.ndim == 3 and value.shape[0] == 1 else value
  return hparams, tensors


def read_gpt2(folder: str | pathlib.Path) -> tuple[dict, dict[str, np.ndarray]]:
  """A GPT-2 checkpoint folder in either format, checked: every tensor there, shapes right."""
  folder = pathlib.Path(folder)
  if not folder.is_dir():
    raise JaxllmError(f"{folder} is not a folder (--from takes a GPT-2 checkpoint folder or one "
                      f"of {', '.join(GPT2_NAMES)})")
  if (folder / "model.safetensors").is_file():
    hparams, tensors = read_hf(folder)
    source, config = folder / "model.safetensors", folder / "config.json"
  elif list(folder.glob("*.ckpt.index")) or (folder / "hparams.json").is_file():
    hparams, tensors = read_openai_tf(folder)
    source, config = folder / "model.ckpt", folder / "hparams.json"
  elif (folder / "pytorch_model.bin").is_file():
    raise JaxllmError(f"{folder} holds pytorch_model.bin only: a pickle, which jaxllm never "
                      f"loads; download model.safetensors instead")
  else:
    raise JaxllmError(f"{folder} holds no GPT-2 checkpoint (expected model.safetensors + "
                      f"config.json, or model.ckpt.* + hparams.json)")
  shapes = {name: shape for name, (_, shape) in tensor_table(hparams).items()}
  common.check_tensors(tensors, shapes, source, config, "GPT-2")
  return hparams, tensors


def run_config(hparams: dict):
  """The jaxllm config of a GPT-2 with these hyperparameters: a preset's sizes when they match."""
  config = config_lib.default_config()
  sizes = {k: hparams[k] for k in ("n_layer", "n_head", "d_model", "context_length")}
  preset = next((name for name, preset in config_lib.PRESETS.items() if preset == sizes), "")
  config.model.preset = preset
  for key, value in sizes.items():
    config.model[key] = value
  config.model.vocab_size = hparams["vocab_size"]
  config.model.bias = True
  config.model.qkv_bias = True
  config.model.tie_embeddings = True
  config.model.layer_norm_epsilon = hparams["layer_norm_epsilon"]
  config.data.tokenizer = "gpt2"
  return config


def _abstract_params(config) -> Any:
  model = GPT(config_lib.model_config(config.model))
  return nn.unbox(abstract_variables(model)["params"])


def to_params(hparams: dict, tensors: dict[str, np.ndarray], config) -> Any:
  """jaxllm's params (float32 numpy) from GPT-2 tensors, checked against the model's shapes."""
  target = _abstract_params(config)
  params: dict = {}
  for name, (path, _) in tensor_table(hparams).items():
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    want = target
    for key in path:
      want = want[key]
    node[path[-1]] = np.asarray(tensors[name], np.float32).reshape(want.shape)
  checkpoint_lib.check_matches(params, target, "the converted GPT-2",
                               "jaxllm's model and this converter disagree (a bug)")
  return params


def from_params(params: Any, hparams: dict) -> dict[str, np.ndarray]:
  """GPT-2 tensors (Hugging Face names and shapes) from jaxllm params."""
  tensors = {}
  for name, (path, shape) in tensor_table(hparams).items():
    value = params
    for key in path:
      value = value[key]
    tensors[name] = np.ascontiguousarray(np.asarray(value, np.float32).reshape(shape))
  return tensors


def import_gpt2(source: str | pathlib.Path, out: str | pathlib.Path) -> dict:
  """Converts a GPT-2 checkpoint folder into a jaxllm run directory; returns its hyperparameters."""
  hparams, tensors = read_gpt2(source)
  config = run_config(hparams)
  run_io.write_run(out, config, to_params(hparams, tensors, config))
  return hparams


def import_checkpoint(source: str | pathlib.Path, out: str | pathlib.Path) -> dict:
  """A GPT-2 (Hugging Face or OpenAI TF) or Llama-family (Llama, Qwen2, Mistral) checkpoint
  folder as a jaxllm run directory; returns its sizes."""
  if llama_weights.is_llama_folder(pathlib.Path(source)):
    return llama_weights.import_llama(source, out)
  if bert_weights.is_bert_folder(pathlib.Path(source)):
    return bert_weights.import_bert(source, out)
  return import_gpt2(source, out)


def export_hf(workdir: str | pathlib.Path, out: str | pathlib.Path) -> dict:
  """A jaxllm run's params as a Hugging Face folder: model.safetensors + config.json, as
  GPT-2, or as Llama / Qwen2 for a run with Llama's components."""
  from safetensors.numpy import save_file

  config, model, params, tokenizer = run_io.load_run(workdir)
  cfg = model.config
  if stacking.is_stacked(params):  # model.scan_layers: Hugging Face keeps one set per layer
    params = stacking.unstack_layers(params)
  if isinstance(cfg, config_lib.EncoderConfig):
    return bert_weights.export_bert(config, model, params, tokenizer, workdir, out)
  common.check_hf_expressible(cfg, workdir)
  if cfg.norm == "rmsnorm" or cfg.position == "rope" or cfg.mlp == "swiglu":
    return llama_weights.export_llama(cfg, params, tokenizer, workdir, out)
  if not (cfg.bias and cfg.qkv_bias and cfg.tie_embeddings):
    raise JaxllmError(f"{workdir}: only GPT-2-shaped models export (model.bias, qkv_bias and "
                      f"tie_embeddings all true)")
  hparams = {"vocab_size": cfg.vocab_size, "context_length": cfg.context_length,
             "d_model": cfg.d_model, "n_head": cfg.n_head, "n_layer": cfg.n_layer,
             "layer_norm_epsilon": cfg.layer_norm_epsilon}
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  save_file(from_params(jax.device_get(params), hparams), out / "model.safetensors",
            metadata={"format": "pt"})
  eot = GPT2_VOCAB_SIZE - 1 if cfg.vocab_size >= GPT2_VOCAB_SIZE else None
  hf_config = {
      "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
      "vocab_size": cfg.vocab_size, "n_positions": cfg.context_length, "n_ctx": cfg.context_length,
      "n_embd": cfg.d_model, "n_head": cfg.n_head, "n_layer": cfg.n_layer, "n_inner": None,
      "activation_function": "gelu_new", "layer_norm_epsilon": cfg.layer_norm_epsilon,
      "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "initializer_range": 0.02,
      # <|endoftext|>, where the vocabulary is GPT-2's.
      "bos_token_id": eot, "eos_token_id": eot,
      "tie_word_embeddings": True, "torch_dtype": "float32",
  }
  (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
  return hparams


def _sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 24), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _fetch(name: str, file: str, dest: pathlib.Path) -> None:
  """Downloads one file of a hub model to `dest`, checking the SHA-256 the hub states for it."""
  url = HF_URL.format(name=name, file=file)
  partial = dest.with_suffix(dest.suffix + ".part")
  try:
    with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as f:
      # Git-LFS files (the weights) carry their SHA-256 as the linked ETag.
      etag = (response.headers.get("X-Linked-Etag") or response.headers.get("ETag") or "")
      shutil.copyfileobj(response, f, 1 << 24)
  except OSError as e:
    partial.unlink(missing_ok=True)
    raise JaxllmError(f"could not download {url} ({e}); on an offline machine, copy the "
                      f"model's folder here and pass it to --from") from e
  expected = etag.strip('"').removeprefix("W/").strip('"')
  if re.fullmatch(r"[0-9a-f]{64}", expected) and _sha256(partial) != expected:
    partial.unlink()
    raise JaxllmError(f"{url}: the download's SHA-256 differs from the hub's; try again")
  partial.rename(dest)


def download(name: str, cache_dir: str | pathlib.Path | None = None) -> pathlib.Path:
  """The Hugging Face folder of GPT-2 `name` (downloaded once into the cache), verified."""
  if name not in GPT2_NAMES:
    raise JaxllmError(f"unknown GPT-2 '{name}' (--from takes a folder or one of "
                      f"{', '.join(GPT2_NAMES)})")
  folder = pathlib.Path(cache_dir or pathlib.Path.home() / ".cache" / "jaxllm") / name
  folder.mkdir(parents=True, exist_ok=True)
  for file in ("config.json", "model.safetensors"):
    if not (folder / file).is_file():
      print(f"downloading {HF_URL.format(name=name, file=file)}")
      _fetch(name, file, folder / file)
  config = common.read_json(folder / "config.json", "the download was cut short; delete the folder")
  want = config_lib.PRESETS[GPT2_NAMES[name]]
  have = {"n_layer": config.get("n_layer"), "n_head": config.get("n_head"),
          "d_model": config.get("n_embd"), "context_length": config.get("n_positions")}
  if have != want or config.get("vocab_size") != GPT2_VOCAB_SIZE:
    raise JaxllmError(f"{folder / 'config.json'} describes {have}, not {name}'s {want}; delete "
                      f"{folder} and convert again")
  return folder
