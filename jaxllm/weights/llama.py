"""Llama-family weights in and out: Hugging Face `LlamaForCausalLM`, `Qwen2ForCausalLM` and
`MistralForCausalLM` folders as jaxllm run directories, and back.

A folder holds `config.json` and `model.safetensors` (or shards listed in
`model.safetensors.index.json`), usually bfloat16; its `tokenizer.json`, where present,
becomes the run's tokenizer. Every jaxllm parameter is a transpose and reshape of one or
three Hugging Face tensors ([out, in] Linear weights):

- q_proj [H*K, D] -> attn.q.kernel (D, H, K); k_proj, v_proj [G*K, D] -> attn.kv.kernel
  (D, 2, G, K); with G = H (no grouping) the three form GPT-2's fused attn.qkv (D, 3, H, K);
- o_proj [D, H*K] -> attn.out.kernel (H, K, D);
- gate_proj, up_proj [F, D] -> mlp.gate / mlp.up kernels (D, F); down_proj [D, F] ->
  mlp.proj.kernel (F, D);
- input_layernorm / post_attention_layernorm / norm -> ln_1 / ln_2 / ln_f scales;
- embed_tokens [V, D] -> wte.embedding; lm_head [V, D] -> lm_head.kernel (D, V) when untied.

Hugging Face stores q and k already permuted for its rotate-half rotary embedding, which is
the one jaxllm computes, so no permutation is needed. Mistral's sliding window is honoured
by setting the context to the window (attention within it is exact).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np

from jaxllm import config as config_lib
from jaxllm.data import tokenizer as tokenizer_lib
from jaxllm.errors import JaxllmError
from jaxllm.models.gpt import GPT, abstract_variables
from jaxllm.training import checkpoint as checkpoint_lib
from jaxllm.training import rundir as run_io
from jaxllm.weights import common

MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "mistral": "MistralForCausalLM"}
REQUIRED_KEYS = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
                 "vocab_size", "max_position_embeddings")


def is_llama_folder(folder: pathlib.Path) -> bool:
  config = folder / "config.json"
  if not config.is_file():
    return False
  try:
    return json.loads(config.read_text()).get("model_type") in MODEL_TYPES
  except json.JSONDecodeError:
    return False


def _rope(hf: dict) -> dict:
  """rope_theta and Llama 3 scaling from either config layout (transformers 5's
  `rope_parameters`, or `rope_theta` + `rope_scaling`)."""
  rope = dict(hf.get("rope_parameters") or {})
  scaling = hf.get("rope_scaling") or {}
  theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
  kind = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
  params = {**scaling, **rope}
  out = {"rope_theta": float(theta)}
  if kind == "llama3":
    out.update(rope_scaling_factor=float(params["factor"]),
               rope_low_freq_factor=float(params["low_freq_factor"]),
               rope_high_freq_factor=float(params["high_freq_factor"]),
               rope_original_context=int(params["original_max_position_embeddings"]))
  elif kind != "default":
    raise JaxllmError(f"rotary scaling '{kind}' is not supported (jaxllm has Llama 3's "
                      f"'llama3' scaling and none)")
  return out


def run_config(hf: dict, source: str):
  """The jaxllm config of a Hugging Face Llama-family config.json."""

  common.required(hf, REQUIRED_KEYS, pathlib.Path(source) / "config.json")
  model_type = hf.get("model_type")
  d, heads = hf["hidden_size"], hf["num_attention_heads"]
  if hf.get("head_dim") not in (None, d // heads):
    raise JaxllmError(f"{source}: head_dim {hf['head_dim']} is not hidden_size / "
                      f"num_attention_heads = {d // heads}, which jaxllm's attention assumes")
  if hf.get("hidden_act", "silu") != "silu" or hf.get("mlp_bias"):
    raise JaxllmError(f"{source}: only SiLU-gated MLPs without biases are supported")
  if model_type == "llama" and hf.get("attention_bias"):
    raise JaxllmError(f"{source}: attention_bias (biases on q/k/v and o_proj) is not supported")
  context = hf["max_position_embeddings"]
  if model_type == "mistral" and hf.get("sliding_window"):
    context = min(context, int(hf["sliding_window"]))
  config = config_lib.default_config()
  m = config.model
  m.n_layer, m.n_head, m.d_model = hf["num_hidden_layers"], heads, d
  m.n_kv_head = hf.get("num_key_value_heads") or heads
  m.mlp_hidden, m.vocab_size, m.context_length = hf["intermediate_size"], hf["vocab_size"], context
  m.norm, m.position, m.mlp = "rmsnorm", "rope", "swiglu"
  m.bias, m.qkv_bias = False, model_type == "qwen2"
  m.tie_embeddings = bool(hf.get("tie_word_embeddings", False))
  m.layer_norm_epsilon = float(hf.get("rms_norm_eps", 1e-6))
  for key, value in _rope(hf).items():
    m[key] = value
  return config


def read_tensors(folder: pathlib.Path) -> dict[str, np.ndarray]:
  """Every tensor of a safetensors checkpoint (one file or an index of shards), float32."""
  from safetensors import SafetensorError, safe_open

  tensors = {}
  for path in _shards(folder):
    try:
      # framework="flax": numpy has no bfloat16, the dtype these checkpoints usually are.
      with safe_open(path, framework="flax") as f:
        for key in f.keys():
          tensors[key] = np.asarray(f.get_tensor(key), np.float32)
    except (SafetensorError, OSError) as e:
      raise JaxllmError(f"{path} cannot be read ({e}); download it again") from None
  return tensors


def _shards(folder: pathlib.Path) -> list[pathlib.Path]:
  """The safetensors files of a checkpoint: model.safetensors, or the shards its index lists."""
  index = folder / "model.safetensors.index.json"
  if not index.is_file():
    if not (folder / "model.safetensors").is_file():
      raise JaxllmError(f"{folder} has neither model.safetensors nor "
                        f"model.safetensors.index.json; pass a Hugging Face model folder")
    return [folder / "model.safetensors"]
  try:
    names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
  except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
    raise JaxllmError(f"{index} is not valid JSON with a weight_map ({e}); download it "
                      f"again") from None
  for name in names:
    if not (folder / name).is_file():
      raise JaxllmError(f"{index} lists {name}, which is not there; download the missing "
                        f"shards into {folder}")
  return [folder / name for name in names]


def tensor_shapes(cfg) -> dict[str, tuple[int, ...]]:
  """Every Hugging Face tensor (without "model.") of this config -> its shape."""
  d, h, g, k, f, v = cfg.d_model, cfg.n_head, cfg.kv_heads, cfg.head_dim, cfg.hidden, cfg.vocab_size
  shapes = {"embed_tokens.weight": (v, d), "norm.weight": (d,)}
  if not cfg.tie_embeddings:
    shapes["lm_head.weight"] = (v, d)
  for i in range(cfg.n_layer):
    pre = f"layers.{i}."
    layer = {"self_attn.q_proj.weight": (h * k, d), "self_attn.k_proj.weight": (g * k, d),
             "self_attn.v_proj.weight": (g * k, d), "self_attn.o_proj.weight": (d, h * k),
             "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d),
             "mlp.down_proj.weight": (d, f), "input_layernorm.weight": (d,),
             "post_attention_layernorm.weight": (d,)}
    if cfg.qkv_bias:
      layer.update({"self_attn.q_proj.bias": (h * k,), "self_attn.k_proj.bias": (g * k,),
                    "self_attn.v_proj.bias": (g * k,)})
    shapes.update({pre + name: shape for name, shape in layer.items()})
  return shapes


def _is_buffer(name: str) -> bool:
  # Older transformers saved each layer's rotary frequencies: computed, not weights.
  return name.endswith("rotary_emb.inv_freq")


def checked_tensors(tensors: dict[str, np.ndarray], cfg, folder: pathlib.Path) -> dict:
  """The tensors under jaxllm's names for them (no "model."), every one checked against the
  config: none missing, none of another shape, none left over but buffers."""

  t = {name.removeprefix("model."): value for name, value in tensors.items()}
  if cfg.tie_embeddings and "lm_head.weight" in t:
    # A tied model's head is the embedding matrix; a file may still hold a copy of it.
    if not np.array_equal(t.pop("lm_head.weight"), t.get("embed_tokens.weight")):
      raise JaxllmError(f"{folder}: lm_head.weight differs from embed_tokens.weight, yet "
                        f"config.json says tie_word_embeddings; set it to false")
  common.check_tensors(t, tensor_shapes(cfg), folder, folder / "config.json",
                        "a Llama-family model", harmless=_is_buffer)
  return t


def _layer_params(t: dict, prefix: str, cfg) -> dict:
  d, h, g, k = cfg.d_model, cfg.n_head, cfg.kv_heads, cfg.head_dim

  def w(name):
    return t[f"{prefix}{name}.weight"]

  q, kk, v = (w(f"self_attn.{p}_proj").T.reshape(d, -1, k) for p in "qkv")
  attn: dict[str, Any] = {"out": {"kernel": w("self_attn.o_proj").T.reshape(h, k, d)}}
  biases = [t[f"{prefix}self_attn.{p}_proj.bias"] for p in "qkv"] if cfg.qkv_bias else None
  if g == h:
    attn["qkv"] = {"kernel": np.stack([q, kk, v], axis=1)}
    if cfg.qkv_bias:
      attn["qkv"]["bias"] = np.stack([b.reshape(-1, k) for b in biases])
  else:
    attn["q"], attn["kv"] = {"kernel": q}, {"kernel": np.stack([kk, v], axis=1)}
    if cfg.qkv_bias:
      attn["q"]["bias"] = biases[0].reshape(h, k)
      attn["kv"]["bias"] = np.stack([biases[1].reshape(g, k), biases[2].reshape(g, k)])
  return {
      "ln_1": {"scale": w("input_layernorm")}, "ln_2": {"scale": w("post_attention_layernorm")},
      "attn": attn,
      "mlp": {"gate": {"kernel": w("mlp.gate_proj").T}, "up": {"kernel": w("mlp.up_proj").T},
              "proj": {"kernel": w("mlp.down_proj").T}},
  }


def to_params(t: dict[str, np.ndarray], cfg) -> dict:
  """jaxllm params from Hugging Face tensors, as `checked_tensors` gives them."""
  params = {"wte": {"embedding": t["embed_tokens.weight"]}, "ln_f": {"scale": t["norm.weight"]}}
  for i in range(cfg.n_layer):
    params[f"blocks_{i}"] = _layer_params(t, f"layers.{i}.", cfg)
  if not cfg.tie_embeddings:
    params["lm_head"] = {"kernel": t["lm_head.weight"].T}
  return params


def from_params(params: Any, cfg) -> dict[str, np.ndarray]:
  """Hugging Face tensors (names and [out, in] shapes) from jaxllm params."""
  d, h, g, k = cfg.d_model, cfg.n_head, cfg.kv_heads, cfg.head_dim
  f32 = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))  # noqa: E731
  out = {"model.embed_tokens.weight": f32(params["wte"]["embedding"]),
         "model.norm.weight": f32(params["ln_f"]["scale"])}
  out["lm_head.weight"] = f32(params["wte"]["embedding"] if cfg.tie_embeddings
                              else np.asarray(params["lm_head"]["kernel"]).T)
  for i in range(cfg.n_layer):
    p, pre = params[f"blocks_{i}"], f"model.layers.{i}."
    attn = p["attn"]
    if g == h:
      q, kk, v = (np.asarray(attn["qkv"]["kernel"])[:, j] for j in range(3))
      biases = list(np.asarray(attn["qkv"]["bias"])) if cfg.qkv_bias else None
    else:
      q = np.asarray(attn["q"]["kernel"])
      kk, v = (np.asarray(attn["kv"]["kernel"])[:, j] for j in range(2))
      biases = ([np.asarray(attn["q"]["bias"])] + list(np.asarray(attn["kv"]["bias"]))
                if cfg.qkv_bias else None)
    for name, kernel in zip("qkv", (q, kk, v)):
      out[f"{pre}self_attn.{name}_proj.weight"] = f32(kernel.reshape(d, -1).T)
    if biases is not None:
      for name, bias in zip("qkv", biases):
        out[f"{pre}self_attn.{name}_proj.bias"] = f32(bias.reshape(-1))
    out[f"{pre}self_attn.o_proj.weight"] = f32(np.asarray(attn["out"]["kernel"]).reshape(h * k, d).T)
    for name, ours in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "proj")):
      out[f"{pre}mlp.{name}.weight"] = f32(np.asarray(p["mlp"][ours]["kernel"]).T)
    out[f"{pre}input_layernorm.weight"] = f32(p["ln_1"]["scale"])
    out[f"{pre}post_attention_layernorm.weight"] = f32(p["ln_2"]["scale"])
  return out


def hf_config(cfg) -> dict:
  """config.json for the exported folder: Qwen2 when q/k/v have biases, else Llama."""
  model_type = "qwen2" if cfg.qkv_bias else "llama"
  scaling = None
  if cfg.rope_scaling_factor:
    scaling = {"rope_type": "llama3", "factor": cfg.rope_scaling_factor,
               "low_freq_factor": cfg.rope_low_freq_factor,
               "high_freq_factor": cfg.rope_high_freq_factor,
               "original_max_position_embeddings": cfg.rope_original_context}
  rope = {"rope_theta": cfg.rope_theta, **(scaling or {"rope_type": "default"})}
  return {
      "architectures": [MODEL_TYPES[model_type]], "model_type": model_type,
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
      "intermediate_size": cfg.hidden, "num_hidden_layers": cfg.n_layer,
      "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads,
      "max_position_embeddings": cfg.context_length, "rms_norm_eps": cfg.layer_norm_epsilon,
      "hidden_act": "silu", "tie_word_embeddings": cfg.tie_embeddings,
      "rope_theta": cfg.rope_theta, "rope_parameters": rope,
      "rope_scaling": scaling,  # the same, as transformers before 5 read it
      "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
  }


def check_exportable(cfg, workdir) -> None:
  if not (cfg.norm == "rmsnorm" and cfg.position == "rope" and cfg.mlp == "swiglu"
          and not cfg.bias and not cfg.qk_norm):
    raise JaxllmError(f"{workdir}: a Llama-family export needs model.norm=rmsnorm, "
                      f"position=rope, mlp=swiglu, bias=false and qk_norm=false")


def _tokenizer_spec(folder: pathlib.Path) -> dict:
  """The run's tokenizer.json: the folder's tokenizer.json, with its eos token as end-of-text."""

  path = folder / "tokenizer.json"
  if not path.is_file():
    raise JaxllmError(f"{folder} has no tokenizer.json; copy the model's tokenizer.json (from "
                      f"the same Hugging Face repository) into it")
  eos = None
  settings = folder / "tokenizer_config.json"
  if settings.is_file():
    try:
      eos = json.loads(settings.read_text()).get("eos_token")
    except (json.JSONDecodeError, AttributeError) as e:
      raise JaxllmError(f"{settings} is not a JSON object ({e}); copy it again from the "
                        f"model's repository, or delete it") from None
    eos = eos.get("content") if isinstance(eos, dict) else eos
  text = path.read_text(encoding="utf-8")
  return tokenizer_lib.HFTokenizer(text, eos, source=str(path)).to_json()


def import_llama(source: str | pathlib.Path, out: str | pathlib.Path) -> dict:
  """Converts a Hugging Face Llama/Qwen2/Mistral folder into a jaxllm run directory."""
  import flax.linen as nn


  folder = pathlib.Path(source)
  hf = json.loads((folder / "config.json").read_text())
  config = run_config(hf, str(folder))
  cfg = config_lib.model_config(config.model)
  spec = _tokenizer_spec(folder)
  params = to_params(checked_tensors(read_tensors(folder), cfg, folder), cfg)
  target = nn.unbox(abstract_variables(GPT(cfg))["params"])
  checkpoint_lib.check_matches(params, target, f"the converted {hf['model_type']} checkpoint",
                               f"{folder / 'config.json'} and its tensors disagree")
  run_io.write_run(out, config, params, spec)
  keep_tokenizer_config(folder, out)
  return sizes(cfg)


def keep_tokenizer_config(source: pathlib.Path, out: str | pathlib.Path) -> None:
  """Copies tokenizer_config.json (its chat template and special tokens, which `jaxllm serve`
  renders chat requests with) from a folder to another, when the folder has one."""
  settings = pathlib.Path(source) / "tokenizer_config.json"
  if settings.is_file():
    (pathlib.Path(out) / "tokenizer_config.json").write_text(settings.read_text(encoding="utf-8"),
                                                             encoding="utf-8")


def sizes(cfg) -> dict:
  """What `jaxllm convert` reports of a converted model."""
  return {"n_layer": cfg.n_layer, "n_head": cfg.n_head, "d_model": cfg.d_model,
          "context_length": cfg.context_length, "vocab_size": cfg.vocab_size}


def export_llama(cfg, params: Any, tokenizer, workdir: str | pathlib.Path,
                 out: str | pathlib.Path) -> dict:
  """A Llama-style run (its model config, params and tokenizer, loaded from `workdir`) as a
  Hugging Face folder: model.safetensors, config.json and, for a Hugging Face tokenizer,
  tokenizer.json."""
  import jax
  from safetensors.numpy import save_file

  check_exportable(cfg, workdir)
  if cfg.scan_layers:
    raise JaxllmError(f"{workdir}: model.scan_layers=true params do not export yet")
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  save_file(from_params(jax.device_get(params), cfg), out / "model.safetensors",
            metadata={"format": "pt"})
  config = hf_config(cfg)
  if tokenizer.name == "hf":
    (out / "tokenizer.json").write_text(json.dumps(tokenizer.to_json()["tokenizer"]))
    config["eos_token_id"] = tokenizer.eot_id
  (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
  keep_tokenizer_config(pathlib.Path(workdir), out)
  return sizes(cfg)
