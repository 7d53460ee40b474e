"""What a run directory holds, and how to read it back.

    DIR/config.json      the resolved config (model sizes filled in)
    DIR/tokenizer.json   how to rebuild the tokenizer
    DIR/params/          the final parameters (Orbax): the GPT, adapters merged
    DIR/head/            a finetuned classifier's head (Orbax)
    DIR/eval.json        the final figures
    DIR/metrics.jsonl    one JSON object per logged step
    DIR/loss.png         the loss curve
    DIR/sample.txt       a text sample from the final model
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging as absl_logging

from jaxllm import config as config_lib
from jaxllm.data import tokenizer as tokenizer_lib
from jaxllm.errors import JaxllmError
from jaxllm.models import bert as encoder_lib
from jaxllm.models import heads, stacking
from jaxllm.models.gpt import GPT, abstract_variables
from jaxllm.training import checkpoint as checkpoint_lib


def resolve_model(model: ml_collections.ConfigDict, tokenizer: tokenizer_lib.Tokenizer
                  ) -> config_lib.ModelConfig | config_lib.EncoderConfig:
  """config.model over `tokenizer`: a GPT's ModelConfig, or an encoder's EncoderConfig (its
  vocabulary holding a [MASK] id, its padding the tokenizer's)."""
  if config_lib.architecture(model) == "bert":
    cfg = config_lib.encoder_config(model, encoder_lib.vocab_size(tokenizer))
    return dataclasses.replace(cfg, pad_id=tokenizer.pad_id)
  return config_lib.model_config(model, tokenizer.vocab_size)


def build_model(cfg: config_lib.ModelConfig | config_lib.EncoderConfig
                ) -> GPT | encoder_lib.Encoder:
  return encoder_lib.Encoder(cfg) if isinstance(cfg, config_lib.EncoderConfig) else GPT(cfg)


def save_run_files(workdir: pathlib.Path, config: ml_collections.ConfigDict,
                   tokenizer: tokenizer_lib.Tokenizer) -> None:
  (workdir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
  (workdir / "tokenizer.json").write_text(json.dumps(tokenizer.to_json()) + "\n")


# Beside Orbax's files in a parameter folder: checksums of the arrays as saved, so bytes
# damaged later are an error at load, not silently different weights.
FINGERPRINT = "jaxllm_fingerprint.json"


def save_params(workdir: pathlib.Path, params: Any, name: str = "params") -> pathlib.Path:
  """Writes a params pytree to workdir/name (Orbax) with its fingerprint; finetuning stores
  its head beside. Every process calls it (each writes its shards)."""
  path = (workdir / name).absolute()
  # Closing waits for the write and ends the checkpointer's threads, which would otherwise
  # live as long as any reference to it (one more per save in a long sweep).
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, params, force=True)
  prints = checkpoint_lib.fingerprint(params)
  if jax.process_index() == 0:
    (path / FINGERPRINT).write_text(json.dumps(prints) + "\n")
  return path


def load_run(workdir: str | pathlib.Path, decoder_for: str = "", overrides=()):
  """(config, model, params, tokenizer) of a finished training run. `decoder_for` names what
  needs a GPT (e.g. "generating text"): an encoder run is then a JaxllmError. `overrides`
  (`section.key=value`) change its config before the model is built; of model.*, only how
  the network runs (config.RUNTIME_KEYS, e.g. model.matmul_dtype) can change."""
  workdir = pathlib.Path(workdir)
  for name in ("config.json", "tokenizer.json", "params"):
    if not (workdir / name).exists():
      raise JaxllmError(f"{workdir / name} not found (is {workdir} the --workdir of a finished "
                        f"`jaxllm train` run?)")
  config = config_lib.from_dict(json.loads((workdir / "config.json").read_text()))
  config_lib.check_read_back_overrides(overrides, workdir)
  config_lib.apply_overrides(config, overrides)
  tokenizer = tokenizer_lib.from_json(json.loads((workdir / "tokenizer.json").read_text()))
  model = build_model(resolve_model(config.model, tokenizer))
  if decoder_for and isinstance(model, encoder_lib.Encoder):
    raise JaxllmError(f"{workdir} holds an encoder (model.architecture=bert); {decoder_for} "
                      f"needs a GPT (decoder) run")
  target = on_one_device(nn.unbox(abstract_variables(model)["params"]))
  params = load_params(workdir, target, fix=f"{workdir / 'config.json'} and the parameters "
                                            f"disagree (was the folder edited by hand?)")
  return config, model, params, tokenizer


def on_one_device(abstract: Any) -> Any:
  """Restore targets with the shapes and dtypes of `abstract`, placed on the first device."""
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)


def load_params(workdir: str | pathlib.Path, target: Any,
                fix: str = "set model.* as in that run's config.json", name: str = "params",
                cast_floats: bool = False) -> Any:
  """A run directory's params/ (or `name`), restored onto `target` (ShapeDtypeStructs with
  shardings).

  Strict: a name, shape or dtype that differs from `target` is a JaxllmError naming it;
  with `cast_floats`, floating-point arrays are read in their stored dtype and cast to
  `target`'s (a float32 run's weights starting a model.dtype=float64 one). GPT blocks stored
  per layer come back stacked for a `scan_layers` target, and the other way round.
  """
  path = (pathlib.Path(workdir) / name).absolute()
  if not path.is_dir():
    raise JaxllmError(f"{path} not found (expected the run directory of `jaxllm train` or "
                      f"`jaxllm convert`)")
  damaged = (f"parameters in {path} cannot be read: the folder is damaged or incomplete; "
             f"write it again (the run, or `jaxllm convert`)")
  wanted = target
  with ocp.StandardCheckpointer() as checkpointer:  # closed on errors too, as in save_params
    try:
      verbosity = absl_logging.get_verbosity()
      absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax would log a warning line first
      try:
        tree = checkpointer.metadata(path).item_metadata.tree
      finally:
        absl_logging.set_verbosity(verbosity)
    except Exception as e:  # truncated, missing or overwritten metadata files
      raise JaxllmError(f"{damaged} ({checkpoint_lib.first_line(e)})") from None
    target = stacking.abstract_in_layout(target, stacking.is_stacked(tree))
    if cast_floats:
      target = checkpoint_lib.with_stored_floats(tree, target)
    checkpoint_lib.check_matches(tree, target, f"parameters in {path}", fix)
    try:
      params = checkpointer.restore(path, target)
    except Exception as e:  # TensorStore's errors on damaged data files
      raise JaxllmError(f"{damaged} ({checkpoint_lib.first_line(e)})") from None
  if (path / FINGERPRINT).is_file():  # folders written before fingerprints have none
    if checkpoint_lib.fingerprint(params) != json.loads((path / FINGERPRINT).read_text()):
      raise JaxllmError(f"{damaged} (its arrays do not match {FINGERPRINT})")
  params = stacking.to_layout(params, wanted)
  return jax.tree.map(lambda x, want: x if x.dtype == want.dtype else x.astype(want.dtype),
                      params, wanted)


def load_finetuned(workdir: str | pathlib.Path, overrides=()):
  """(config, backbone, {"backbone", "head"}, tokenizer) of a finetuned run; `overrides`
  (`section.key=value`) change its config, e.g. judge.url for a later scoring."""
  workdir = pathlib.Path(workdir)
  config, model, backbone_params, tokenizer = load_run(workdir, overrides=overrides)
  head = load_head(workdir, config, model) if config.train.task == "classify" else {}
  return config, model, {"backbone": backbone_params, "head": head}, tokenizer


def load_head(workdir: pathlib.Path, config: ml_collections.ConfigDict, model) -> Any:
  """A finished classifier run's head/ (its classes from config.classifier.labels)."""

  if not (workdir / "head").is_dir():
    raise JaxllmError(f"{workdir / 'head'} not found (is {workdir} a finished classifier "
                      f"run?)")
  num_classes = len(config.classifier.labels.split(","))
  target = on_one_device(jax.eval_shape(
      lambda: heads.classifier_init(jax.random.key(0), model.config.d_model, num_classes)))
  return load_params(workdir, target, name="head",
                     fix=f"classifier.labels in {workdir / 'config.json'} and the head "
                         f"disagree (was the folder edited by hand?)")


def write_run(out: str | pathlib.Path, config, params: Any,
              tokenizer: dict | None = None) -> pathlib.Path:
  """A run directory that `jaxllm generate --workdir`, `load_run` and
  `train.init_from` read: config.json, tokenizer.json (GPT-2's BPE unless given) and params/."""
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
  tokenizer = tokenizer or {"kind": "tiktoken", "name": "gpt2"}
  (out / "tokenizer.json").write_text(json.dumps(tokenizer) + "\n")
  save_params(out, params)
  return out
