"""BERT weights in and out: Hugging Face `BertModel`, `BertForMaskedLM` and
`BertForSequenceClassification` folders (`config.json` + `model.safetensors`) as
jaxllm/models/bert.py parameters, and back.

Every encoder parameter is a transpose and reshape of Hugging Face tensors ([out, in] Linear
weights); a layer's query, key and value form one fused qkv kernel (D, 3, H, K), its
attention output dense the out kernel (H, K, D). The masked-LM decoder is tied to the word
embeddings in every BERT checkpoint, so only its bias (`cls.predictions.bias`) is stored. A
classifier's Linear on the pooled state becomes a head `{"kernel": DxC, "bias": C}` beside
the encoder's parameters.
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any

import numpy as np
from flax import traverse_util

from jaxllm import config as config_lib
from jaxllm.data.tokenizer import WordPieceTokenizer
from jaxllm.errors import JaxllmError
from jaxllm.models import bert as encoder_lib
from jaxllm.models.bert import EncoderConfig
from jaxllm.training import checkpoint as checkpoint_lib
from jaxllm.training import rundir as run_io
from jaxllm.weights import common

ARCHITECTURES = ("BertModel", "BertForMaskedLM", "BertForSequenceClassification")
REQUIRED_KEYS = ("vocab_size", "max_position_embeddings", "num_hidden_layers",
                 "num_attention_heads", "hidden_size", "intermediate_size")
# Tensors of Hugging Face BERT files that are no weights of jaxllm's: the position-id buffer
# older transformers saved, the masked-LM decoder (a copy of the word embeddings and of
# cls.predictions.bias, which jaxllm ties), and BertForPreTraining's next-sentence head, which
# bert-base-uncased's file holds and no jaxllm task uses.
_KNOWN_EXTRAS = re.compile(r"embeddings\.position_ids|cls\.predictions\.decoder\.(weight|bias)"
                           r"|cls\.seq_relationship\.(weight|bias)")


def is_bert_folder(folder: pathlib.Path) -> bool:
  config = pathlib.Path(folder) / "config.json"
  try:
    return json.loads(config.read_text()).get("model_type") == "bert"
  except (OSError, json.JSONDecodeError):
    return False


def encoder_config(hf: dict, source: str) -> EncoderConfig:
  """The EncoderConfig of a Hugging Face BertConfig (config.json)."""
  if hf.get("model_type") != "bert":
    raise JaxllmError(f"{source}: model_type is '{hf.get('model_type')}', not 'bert'")

  common.required(hf, REQUIRED_KEYS, pathlib.Path(source) / "config.json")
  if hf.get("hidden_act", "gelu") != "gelu":
    raise JaxllmError(f"{source}: hidden_act '{hf['hidden_act']}' is not supported (BERT's "
                      f"exact 'gelu' is)")
  if hf.get("position_embedding_type", "absolute") != "absolute":
    raise JaxllmError(f"{source}: position_embedding_type "
                      f"'{hf['position_embedding_type']}' is not supported ('absolute' is)")
  return EncoderConfig(
      vocab_size=int(hf["vocab_size"]), context_length=int(hf["max_position_embeddings"]),
      n_layer=int(hf["num_hidden_layers"]), n_head=int(hf["num_attention_heads"]),
      d_model=int(hf["hidden_size"]), mlp_hidden=int(hf["intermediate_size"]),
      type_vocab_size=int(hf.get("type_vocab_size", 2)),
      layer_norm_epsilon=float(hf.get("layer_norm_eps", 1e-12)),
      pad_id=int(hf.get("pad_token_id") or 0))


def tensor_shapes(cfg: EncoderConfig, names) -> dict[str, tuple]:
  """Every Hugging Face tensor (without "bert.") of this config -> its shape (None: any size),
  for the heads some of `names` belong to."""
  d, f = cfg.d_model, cfg.hidden

  def linear(name, n_out, n_in):
    return {f"{name}.weight": (n_out, n_in), f"{name}.bias": (n_out,)}

  def norm(name):
    return {f"{name}.weight": (d,), f"{name}.bias": (d,)}

  shapes = {"embeddings.word_embeddings.weight": (cfg.vocab_size, d),
            "embeddings.position_embeddings.weight": (cfg.context_length, d),
            "embeddings.token_type_embeddings.weight": (cfg.type_vocab_size, d),
            **norm("embeddings.LayerNorm")}
  for i in range(cfg.n_layer):
    p = f"encoder.layer.{i}."
    for n in ("query", "key", "value"):
      shapes.update(linear(f"{p}attention.self.{n}", d, d))
    shapes.update({**linear(f"{p}attention.output.dense", d, d),
                   **norm(f"{p}attention.output.LayerNorm"),
                   **linear(f"{p}intermediate.dense", f, d), **linear(f"{p}output.dense", d, f),
                   **norm(f"{p}output.LayerNorm")})
  heads = {"cls.predictions.": {"cls.predictions.bias": (cfg.vocab_size,),
                                **linear("cls.predictions.transform.dense", d, d),
                                **norm("cls.predictions.transform.LayerNorm")},
           "pooler.": linear("pooler.dense", d, d),
           "classifier.": {"classifier.weight": (None, d), "classifier.bias": (None,)}}
  present = [n for n in names if not _KNOWN_EXTRAS.fullmatch(n)]
  for prefix, head in heads.items():
    if any(n.startswith(prefix) for n in present):
      shapes.update(head)
  return shapes


def _linear(tensors, name):
  return {"kernel": tensors[f"{name}.weight"].T, "bias": tensors[f"{name}.bias"]}


def _norm(tensors, name):
  return {"scale": tensors[f"{name}.weight"], "bias": tensors[f"{name}.bias"]}


def to_params(cfg: EncoderConfig, tensors: dict[str, np.ndarray]) -> tuple[dict, dict | None]:
  """(encoder params, classifier head or None) from a folder's tensors (any prefix "bert.").

  Heads the checkpoint does not have (BertModel: no MLM head; BertForMaskedLM: no pooler)
  are left out; `complete` fills them in from a fresh init.
  """
  t = {name.removeprefix("bert."): np.asarray(value, np.float32)
       for name, value in tensors.items()}
  d, h, k = cfg.d_model, cfg.n_head, cfg.head_dim
  params: dict[str, Any] = {
      "wte": {"embedding": t["embeddings.word_embeddings.weight"]},
      "wpe": {"embedding": t["embeddings.position_embeddings.weight"]},
      "wtt": {"embedding": t["embeddings.token_type_embeddings.weight"]},
      "ln_embed": _norm(t, "embeddings.LayerNorm")}
  for i in range(cfg.n_layer):
    p = f"encoder.layer.{i}."
    qkv = [t[f"{p}attention.self.{n}.weight"].T.reshape(d, h, k) for n in ("query", "key", "value")]
    qkv_bias = [t[f"{p}attention.self.{n}.bias"].reshape(h, k) for n in ("query", "key", "value")]
    params[f"blocks_{i}"] = {
        "attn": {"qkv": {"kernel": np.stack(qkv, axis=1), "bias": np.stack(qkv_bias)},
                 "out": {"kernel": t[f"{p}attention.output.dense.weight"].T.reshape(h, k, d),
                         "bias": t[f"{p}attention.output.dense.bias"]}},
        "ln_1": _norm(t, f"{p}attention.output.LayerNorm"),
        "fc": _linear(t, f"{p}intermediate.dense"),
        "proj": _linear(t, f"{p}output.dense"),
        "ln_2": _norm(t, f"{p}output.LayerNorm")}
  if "cls.predictions.bias" in t:
    params["mlm_transform"] = _linear(t, "cls.predictions.transform.dense")
    params["mlm_ln"] = _norm(t, "cls.predictions.transform.LayerNorm")
    params["mlm_bias"] = t["cls.predictions.bias"]
  if "pooler.dense.weight" in t:
    params["pooler"] = _linear(t, "pooler.dense")
  head = _linear(t, "classifier") if "classifier.weight" in t else None
  return params, head


def from_params(cfg: EncoderConfig, params: dict, head: dict | None,
                architecture: str) -> dict[str, np.ndarray]:
  """Hugging Face tensors of `architecture` (one of ARCHITECTURES) from encoder params."""
  d = cfg.d_model
  prefix = "" if architecture == "BertModel" else "bert."
  p = {k: np.asarray(v, np.float32)
       for k, v in traverse_util.flatten_dict(params, sep="/").items()}
  out = {f"{prefix}embeddings.word_embeddings.weight": p["wte/embedding"],
         f"{prefix}embeddings.position_embeddings.weight": p["wpe/embedding"],
         f"{prefix}embeddings.token_type_embeddings.weight": p["wtt/embedding"],
         f"{prefix}embeddings.LayerNorm.weight": p["ln_embed/scale"],
         f"{prefix}embeddings.LayerNorm.bias": p["ln_embed/bias"]}

  def linear(name, ours):
    out[f"{name}.weight"] = np.ascontiguousarray(p[f"{ours}/kernel"].T)
    out[f"{name}.bias"] = p[f"{ours}/bias"]

  def norm(name, ours):
    out[f"{name}.weight"], out[f"{name}.bias"] = p[f"{ours}/scale"], p[f"{ours}/bias"]

  for i in range(cfg.n_layer):
    hf, ours = f"{prefix}encoder.layer.{i}.", f"blocks_{i}/"
    qkv, qkv_bias = p[f"{ours}attn/qkv/kernel"], p[f"{ours}attn/qkv/bias"]
    for j, name in enumerate(("query", "key", "value")):
      out[f"{hf}attention.self.{name}.weight"] = np.ascontiguousarray(qkv[:, j].reshape(d, d).T)
      out[f"{hf}attention.self.{name}.bias"] = qkv_bias[j].reshape(d)
    out[f"{hf}attention.output.dense.weight"] = np.ascontiguousarray(
        p[f"{ours}attn/out/kernel"].reshape(d, d).T)
    out[f"{hf}attention.output.dense.bias"] = p[f"{ours}attn/out/bias"]
    norm(f"{hf}attention.output.LayerNorm", f"{ours}ln_1")
    linear(f"{hf}intermediate.dense", f"{ours}fc")
    linear(f"{hf}output.dense", f"{ours}proj")
    norm(f"{hf}output.LayerNorm", f"{ours}ln_2")
  if architecture == "BertForMaskedLM":
    linear("cls.predictions.transform.dense", "mlm_transform")
    norm("cls.predictions.transform.LayerNorm", "mlm_ln")
    out["cls.predictions.bias"] = p["mlm_bias"]
  else:
    linear(f"{prefix}pooler.dense", "pooler")
  if architecture == "BertForSequenceClassification":
    if head is None:
      raise JaxllmError("BertForSequenceClassification needs a classifier head")
    out["classifier.weight"] = np.ascontiguousarray(np.asarray(head["kernel"], np.float32).T)
    out["classifier.bias"] = np.asarray(head["bias"], np.float32)
  return out


def complete(params: dict, fresh: dict) -> dict:
  """`params` with the top-level entries it lacks (a head the checkpoint did not have) taken
  from `fresh` (encoder.init_params of the same config)."""
  return {**fresh, **params}


def hf_config(cfg: EncoderConfig, architecture: str, num_labels: int = 2,
              labels: list[str] | None = None) -> dict:
  """A config.json that transformers' BertConfig reads back as `cfg` (a classifier's classes
  named `labels`, else LABEL_0, LABEL_1, ...)."""
  config = {"architectures": [architecture], "model_type": "bert",
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
            "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
            "intermediate_size": cfg.hidden, "hidden_act": "gelu",
            "max_position_embeddings": cfg.context_length,
            "type_vocab_size": cfg.type_vocab_size, "layer_norm_eps": cfg.layer_norm_epsilon,
            "pad_token_id": cfg.pad_id, "position_embedding_type": "absolute",
            "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}
  if architecture == "BertForSequenceClassification":
    names = labels or [f"LABEL_{i}" for i in range(num_labels)]
    config["id2label"] = {str(i): name for i, name in enumerate(names)}
    config["label2id"] = {name: i for i, name in enumerate(names)}
  return config


def read_folder(folder: str | pathlib.Path) -> tuple[EncoderConfig, dict, dict | None, str]:
  """(config, encoder params, classifier head or None, architecture) of a Hugging Face BERT
  folder, every tensor checked: none missing, none of another shape, none unknown."""
  from safetensors import SafetensorError
  from safetensors.numpy import load_file


  folder = pathlib.Path(folder)
  config_path, weights = folder / "config.json", folder / "model.safetensors"
  for path in (config_path, weights):
    if not path.is_file():
      raise JaxllmError(f"{path} not found (a Hugging Face BERT folder holds config.json and "
                        f"model.safetensors)")
  try:
    hf = json.loads(config_path.read_text())
  except json.JSONDecodeError as e:
    raise JaxllmError(f"{config_path} is not valid JSON ({e})") from None
  cfg = encoder_config(hf, str(folder))
  try:
    tensors = {name.removeprefix("bert."): value for name, value in load_file(str(weights)).items()}
  except (SafetensorError, OSError) as e:
    raise JaxllmError(f"{weights} cannot be read ({e}); download it again") from None
  common.check_tensors(tensors, tensor_shapes(cfg, tensors), weights, config_path, "BERT",
                        harmless=_KNOWN_EXTRAS.fullmatch)
  params, head = to_params(cfg, tensors)
  architecture = (hf.get("architectures") or ["BertModel"])[0]
  return cfg, params, head, architecture


def write_folder(folder: str | pathlib.Path, cfg: EncoderConfig, params: dict,
                 head: dict | None = None, architecture: str = "BertForMaskedLM",
                 labels: list[str] | None = None) -> None:
  """A Hugging Face folder (config.json + model.safetensors) of `architecture`."""
  from safetensors.numpy import save_file
  if architecture not in ARCHITECTURES:
    raise JaxllmError(f"unknown BERT architecture '{architecture}' (one of "
                      f"{', '.join(ARCHITECTURES)})")
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  num_labels = 2 if head is None else int(np.asarray(head["bias"]).shape[0])
  (folder / "config.json").write_text(
      json.dumps(hf_config(cfg, architecture, num_labels, labels), indent=1))
  save_file(from_params(cfg, params, head, architecture), str(folder / "model.safetensors"),
            metadata={"format": "pt"})


# --- Run directories ----------------------------------------------------------------------


def run_config(cfg: EncoderConfig, hf: dict, head: dict | None):
  """The jaxllm config of a converted BERT: its sizes (bert-base's preset when they match);
  a classifier folder's run is a classify run with its labels and [CLS] pooling."""

  config = config_lib.default_config()
  model = config.model
  sizes = dict(n_layer=cfg.n_layer, n_head=cfg.n_head, d_model=cfg.d_model,
               context_length=cfg.context_length)
  model.preset = next((name for name, preset in config_lib.PRESETS.items()
                       if preset.get("architecture") == "bert"
                       and {k: preset[k] for k in sizes} == sizes), "")
  with model.ignore_type():
    model.architecture = "bert"
    for key, value in sizes.items():
      model[key] = value
    model.vocab_size = cfg.vocab_size
    model.mlp_hidden = cfg.hidden
    model.type_vocab_size = cfg.type_vocab_size
    model.layer_norm_epsilon = cfg.layer_norm_epsilon
    model.pre_norm = False
  config.data.tokenizer = "wordpiece"
  if head is not None:
    id2label = hf.get("id2label") or {}
    count = int(np.asarray(head["bias"]).shape[0])
    config.train.task = "classify"
    config.classifier.labels = ",".join(str(id2label.get(str(i), f"LABEL_{i}"))
                                        for i in range(count))
    config.classifier.pooling = "cls"
  return config


def sizes(cfg: EncoderConfig) -> dict:
  return {"n_layer": cfg.n_layer, "n_head": cfg.n_head, "d_model": cfg.d_model,
          "context_length": cfg.context_length, "vocab_size": cfg.vocab_size}


def import_bert(source: str | pathlib.Path, out: str | pathlib.Path) -> dict:
  """A Hugging Face BERT folder (config.json, model.safetensors, and tokenizer.json or
  vocab.txt) as a jaxllm encoder run directory: params/ (heads the folder lacks freshly
  initialised: BertModel has no masked-LM head, BertForMaskedLM no pooler) and, for a
  BertForSequenceClassification, head/ as a classify run's. Returns the sizes."""
  import jax


  folder = pathlib.Path(source)
  cfg, params, head, _ = read_folder(folder)
  tokenizer = WordPieceTokenizer.from_path(folder)
  fresh = jax.device_get(encoder_lib.init_params(encoder_lib.Encoder(cfg), jax.random.key(0)))
  params = complete(params, fresh)
  checkpoint_lib.check_matches(params, fresh, f"the converted BERT in {folder}",
                               f"{folder / 'config.json'} and its tensors disagree")
  config = run_config(cfg, json.loads((folder / "config.json").read_text()), head)
  run_io.write_run(out, config, params, tokenizer.to_json())
  if head is not None:
    run_io.save_params(pathlib.Path(out), head, name="head")
  return sizes(cfg)


def export_bert(config, model, params: dict, tokenizer, workdir: str | pathlib.Path,
                out: str | pathlib.Path) -> dict:
  """An encoder run as a Hugging Face folder: BertForSequenceClassification for a classify
  run with [CLS] pooling, else BertForMaskedLM; tokenizer.json beside for WordPiece."""
  import jax


  head, architecture, labels = None, "BertForMaskedLM", None
  if config.train.task == "classify":
    if config.classifier.pooling != "cls":
      raise JaxllmError(f"{workdir}: a classifier with {config.classifier.pooling} pooling has "
                        f"no Hugging Face counterpart (BertForSequenceClassification reads the "
                        f"pooler: classifier.pooling=cls)")
    head = jax.device_get(run_io.load_head(pathlib.Path(workdir), config, model))
    architecture, labels = "BertForSequenceClassification", config.classifier.labels.split(",")
  write_folder(out, model.config, jax.device_get(params), head, architecture, labels)
  spec = tokenizer.to_json()
  if spec.get("kind") == "wordpiece":
    (pathlib.Path(out) / "tokenizer.json").write_text(json.dumps(spec["tokenizer"]) + "\n")
  return sizes(model.config)
