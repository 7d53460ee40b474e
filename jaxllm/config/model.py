"""The model section resolved: a preset and explicit keys into the frozen `ModelConfig` (a GPT)
or `EncoderConfig` (a BERT-style encoder) that builds the network."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections

from jaxllm.config.defaults import DEFAULT_PRESET, PRESETS
from jaxllm.errors import JaxllmError


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The resolved architecture: every field is concrete."""

  vocab_size: int
  context_length: int
  n_layer: int
  n_head: int
  d_model: int
  dropout: float = 0.0
  bias: bool = True
  qkv_bias: bool = True
  tie_embeddings: bool = True
  dtype: str = "float32"
  matmul_dtype: str = "float32"  # "bfloat16": bf16 operands, float32 products (jaxllm/models/matmul.py)
  layer_norm_epsilon: float = 1e-5
  embedding_init_std: float = 0.02
  remat: str = "none"  # "none" | "full" | "dots": what each block keeps for the backward pass
  scan_layers: bool = False  # one nn.scan over stacked blocks: compile time flat in n_layer
  norm: str = "layernorm"  # "layernorm" | "rmsnorm"
  position: str = "learned"  # "learned" | "rope"
  rope_theta: float = 10000.0
  rope_scaling_factor: float = 0.0  # Llama 3's frequency scaling; 0 = none
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_context: int = 8192
  mlp: str = "gelu"  # "gelu" | "swiglu" | "relu2"
  mlp_hidden: int = 0  # 0 = 4 * d_model
  n_kv_head: int = 0  # 0 = n_head
  qk_norm: bool = False
  zero_init_proj: bool = False  # attention out, MLP proj and an untied head start at zero
  logit_softcap: float = 0.0  # logits = C tanh(logits / C); 0 = off
  x0_shortcut: bool = False  # each block's input: lambda x + mu x0 (learned; 1 and 0 at init)
  value_residual: bool = False  # each layer's values: a v + b v_first (learned; 1 and 0)

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_head

  @property
  def kv_heads(self) -> int:
    return self.n_kv_head or self.n_head

  @property
  def hidden(self) -> int:
    return self.mlp_hidden or 4 * self.d_model


# GPT-2's value of every architecture key whose config default is None.
_GPT2 = dict(bias=True, tie_embeddings=True, norm="layernorm", layer_norm_epsilon=1e-5,
             position="learned", rope_theta=10000.0, rope_scaling_factor=0.0,
             rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_context=8192,
             mlp="gelu", mlp_hidden=0, n_kv_head=0, qk_norm=False)
_CHOICES = {"norm": ("layernorm", "rmsnorm"), "position": ("learned", "rope"),
            "mlp": ("gelu", "swiglu", "relu2"), "dtype": ("float32", "bfloat16", "float64"),
            "matmul_dtype": ("float32", "bfloat16"), "remat": ("none", "full", "dots")}


def _preset(model: ml_collections.ConfigDict) -> tuple[str, dict[str, Any]]:
  preset_name = model.preset or (
      "bert-nano" if model.get("architecture") == "bert" else DEFAULT_PRESET)
  if preset_name not in PRESETS:
    raise JaxllmError(
        f"unknown preset '{model.preset}' (model.preset takes one of: {', '.join(PRESETS)})")
  preset = PRESETS[preset_name]
  unknown = sorted(set(preset) - set(model.keys()))
  if unknown:
    raise JaxllmError(f"preset '{preset_name}' sets unknown model key(s) {unknown} (a bug in "
                      f"jaxllm.config.PRESETS)")
  return preset_name, preset


ARCHITECTURES = ("gpt", "bert")


def architecture(model: ml_collections.ConfigDict) -> str:
  """model.architecture, else the preset's, else gpt."""
  value = model.get("architecture") or _preset(model)[1].get("architecture", "gpt")
  if value not in ARCHITECTURES:
    raise JaxllmError(f"model.architecture must be one of {', '.join(ARCHITECTURES)}, got "
                      f"'{value}'")
  return value


def architecture_of(cfg: "ModelConfig | EncoderConfig") -> str:
  return "bert" if isinstance(cfg, EncoderConfig) else "gpt"


def resolve(model: ml_collections.ConfigDict, vocab_size: int | None = None
            ) -> "ModelConfig | EncoderConfig":
  """config.model as the architecture it names: `model_config` or `encoder_config`."""
  if architecture(model) == "bert":
    return encoder_config(model, vocab_size)
  return model_config(model, vocab_size)


def _picker(model: ml_collections.ConfigDict, preset: dict, defaults: dict):
  """A key's value: explicit in config.model, else the preset's, else `defaults`'."""
  def pick(key):
    if model.get(key) is not None:
      return model[key]
    return preset.get(key, defaults.get(key))
  return pick


def _sizes(pick) -> dict[str, int]:
  return {k: int(pick(k)) for k in ("n_layer", "n_head", "d_model", "context_length")}


def _vocab(model: ml_collections.ConfigDict, vocab_size: int | None, preset: dict) -> int:
  vocab = next((v for v in (model.vocab_size, vocab_size, preset.get("vocab_size"))
                if v is not None), None)
  if vocab is None:
    raise JaxllmError("model.vocab_size is unknown (set it, or build the model from a tokenizer)")
  return vocab


def model_config(model: ml_collections.ConfigDict, vocab_size: int | None = None) -> ModelConfig:
  """Resolves config.model into a ModelConfig: an explicit key, else the preset's value, else
  GPT-2's. The vocabulary: model.vocab_size, else `vocab_size` (the tokenizer's), else the
  preset's."""
  _, preset = _preset(model)
  if architecture(model) != "gpt":
    raise JaxllmError(f"model.architecture is '{architecture(model)}', an encoder: a GPT "
                      f"(decoder) is needed here (set model.architecture=gpt)")
  for key in _ENCODER_ONLY:
    if model.get(key) is not None:
      raise JaxllmError(f"model.{key} applies to encoders (model.architecture=bert) only")

  pick = _picker(model, preset, _GPT2)
  sizes, vocab = _sizes(pick), _vocab(model, vocab_size, preset)
  arch = {k: pick(k) for k in _GPT2}
  bias = bool(arch.pop("bias"))
  qkv_bias = model.qkv_bias if model.qkv_bias is not None else preset.get("qkv_bias", bias)
  for key, allowed in _CHOICES.items():
    value = arch.get(key, model.get(key))
    if value not in allowed:
      raise JaxllmError(f"model.{key} must be one of {', '.join(allowed)}, got '{value}'")
  _check_shapes(sizes, arch)
  _check_runtime(model)
  if model.logit_softcap < 0:
    raise JaxllmError(f"model.logit_softcap must be >= 0 (0 = off; the speedrun's: 15 or 30), "
                      f"got {model.logit_softcap}")
  return ModelConfig(
      vocab_size=int(vocab), dropout=float(model.dropout), bias=bias, qkv_bias=bool(qkv_bias),
      dtype=model.dtype, matmul_dtype=model.matmul_dtype,
      embedding_init_std=float(model.embedding_init_std),
      remat=model.remat, scan_layers=bool(model.scan_layers),
      tie_embeddings=bool(arch["tie_embeddings"]),
      layer_norm_epsilon=float(arch["layer_norm_epsilon"]), norm=arch["norm"],
      position=arch["position"], rope_theta=float(arch["rope_theta"]),
      rope_scaling_factor=float(arch["rope_scaling_factor"]),
      rope_low_freq_factor=float(arch["rope_low_freq_factor"]),
      rope_high_freq_factor=float(arch["rope_high_freq_factor"]),
      rope_original_context=int(arch["rope_original_context"]), mlp=arch["mlp"],
      mlp_hidden=int(arch["mlp_hidden"]), n_kv_head=int(arch["n_kv_head"]),
      qk_norm=bool(arch["qk_norm"]), zero_init_proj=bool(model.zero_init_proj),
      logit_softcap=float(model.logit_softcap), x0_shortcut=bool(model.x0_shortcut),
      value_residual=bool(model.value_residual), **sizes)


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """A resolved BERT-style encoder (jaxllm/models/bert.py); Hugging Face's BertConfig names in
  comments."""

  vocab_size: int  # vocab_size
  context_length: int  # max_position_embeddings
  n_layer: int  # num_hidden_layers
  n_head: int  # num_attention_heads
  d_model: int  # hidden_size
  mlp_hidden: int = 0  # intermediate_size; 0 = 4 * d_model
  type_vocab_size: int = 2  # segments (sentence A / B)
  layer_norm_epsilon: float = 1e-12
  dropout: float = 0.0  # hidden_dropout_prob and attention_probs_dropout_prob
  pre_norm: bool = False
  pad_id: int = 0  # pad_token_id: what `Encoder.encode` masks out when given no mask
  dtype: str = "float32"

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_head

  @property
  def hidden(self) -> int:
    return self.mlp_hidden or 4 * self.d_model


# Model keys an encoder has, beyond the sizes, and their BERT values.
_BERT = dict(mlp_hidden=0, type_vocab_size=2, layer_norm_epsilon=1e-12, pre_norm=False)
_ENCODER_ONLY = ("type_vocab_size", "pre_norm")
# Decoder keys an encoder does not have, and the values that mean "not used".
_DECODER_ONLY = dict(bias=None, qkv_bias=None, tie_embeddings=None, norm=None, position=None,
                     rope_theta=None, rope_scaling_factor=None, rope_low_freq_factor=None,
                     rope_high_freq_factor=None, rope_original_context=None, mlp=None,
                     n_kv_head=None, qk_norm=None, matmul_dtype="float32",
                     embedding_init_std=0.02, remat="none", scan_layers=False,
                     zero_init_proj=False, logit_softcap=0.0, x0_shortcut=False,
                     value_residual=False)


def encoder_config(model: ml_collections.ConfigDict, vocab_size: int | None = None
                   ) -> EncoderConfig:
  """Resolves config.model (model.architecture=bert) into an EncoderConfig: an explicit key,
  else the preset's value, else BERT's. The vocabulary as in `model_config`."""
  preset_name, preset = _preset(model)
  for key, unused in _DECODER_ONLY.items():
    if model.get(key) != unused:
      raise JaxllmError(f"model.{key}={model.get(key)} applies to GPT decoders; this model is "
                        f"an encoder (model.architecture=bert): leave it unset")
  if preset.get("architecture", "gpt") != "bert" and model.preset:
    raise JaxllmError(f"model.preset '{preset_name}' is a GPT; for an encoder take a bert-* "
                      f"preset or give the sizes (model.n_layer, n_head, d_model, "
                      f"context_length)")

  pick = _picker(model, preset, _BERT)
  sizes, vocab = _sizes(pick), _vocab(model, vocab_size, preset)
  if sizes["d_model"] % sizes["n_head"]:
    raise JaxllmError(f"model.d_model={sizes['d_model']} is not divisible by "
                      f"model.n_head={sizes['n_head']}")
  _check_runtime(model)
  return EncoderConfig(
      vocab_size=int(vocab), mlp_hidden=int(pick("mlp_hidden")),
      type_vocab_size=int(pick("type_vocab_size")),
      layer_norm_epsilon=float(pick("layer_norm_epsilon")), dropout=float(model.dropout),
      pre_norm=bool(pick("pre_norm")), dtype=model.dtype, **sizes)


def _check_runtime(model: ml_collections.ConfigDict) -> None:
  """model.dtype and model.dropout, for GPTs and encoders alike."""
  if model.dtype not in _CHOICES["dtype"]:
    raise JaxllmError(f"model.dtype must be one of {', '.join(_CHOICES['dtype'])}, got "
                      f"'{model.dtype}'")
  if model.dtype == "float64" and not jax.config.jax_enable_x64:
    raise JaxllmError("model.dtype=float64 needs JAX's 64-bit mode: run with JAX_ENABLE_X64=1 "
                      "in the environment")
  if model.dtype == "float64" and model.get("matmul_dtype", "float32") != "float32":
    raise JaxllmError(f"model.dtype=float64 with model.matmul_dtype={model.matmul_dtype}: "
                      f"bf16 matmuls return float32; keep model.matmul_dtype=float32")
  if not 0.0 <= model.dropout < 1.0:
    raise JaxllmError(f"model.dropout must be in [0, 1), got {model.dropout}")


def _check_shapes(sizes: dict, arch: dict) -> None:
  d_model, n_head = sizes["d_model"], sizes["n_head"]
  if d_model % n_head:
    raise JaxllmError(f"model.d_model={d_model} is not divisible by model.n_head={n_head}")
  kv = arch["n_kv_head"] or n_head
  if n_head % kv:
    raise JaxllmError(f"model.n_head={n_head} is not divisible by model.n_kv_head={kv} (each "
                      f"kv head serves n_head / n_kv_head query heads)")
  if arch["position"] == "rope" and (d_model // n_head) % 2:
    raise JaxllmError(f"rotary positions need an even head dim; d_model / n_head = "
                      f"{d_model // n_head}")
  if arch["mlp"] == "swiglu" and not arch["mlp_hidden"]:
    raise JaxllmError("model.mlp=swiglu needs model.mlp_hidden (e.g. 8/3 * d_model rounded "
                      "up to a multiple of 64; Llama's 1B: 8192 for d_model 2048)")
