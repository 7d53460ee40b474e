"""Experiment files, command-line overrides, and config.json read back (old key names
migrated)."""

from __future__ import annotations

import ast
import importlib.util
import pathlib
from typing import Any, Sequence

import ml_collections

from jaxllm.config.defaults import default_config
from jaxllm.errors import JaxllmError

# Keys that moved when pretraining and finetuning became tasks of one trainer: old name -> new.
RENAMED = {
    "finetune.task": "train.task",
    "finetune.init_from": "train.init_from",
    "finetune.trainable": "train.trainable",
    "classifier.path": "data.path",
    "instruct.path": "data.path",
}


def load_experiment(path: str | pathlib.Path) -> tuple[Any, ml_collections.ConfigDict]:
  """An experiment file's module (its EXPECTED figures, ...) and its `get_config()`."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise JaxllmError(f"config file not found: {path} (pass --config experiments/<name>.py)")
  spec = importlib.util.spec_from_file_location(f"jaxllm_experiment_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise JaxllmError(f"config file {path} defines no get_config() (see experiments/)")
  try:
    config = module.get_config()
  except AttributeError as e:  # most likely a section or key that was renamed
    moved = ", ".join(f"{old} -> {new}" for old, new in RENAMED.items())
    raise JaxllmError(f"config file {path}: {e} (keys that moved: {moved})") from None
  check_keys(config)
  return module, config


def load_config(path: str | pathlib.Path) -> ml_collections.ConfigDict:
  """Runs an experiment file's `get_config()`."""
  return load_experiment(path)[1]


def check_keys(config: ml_collections.ConfigDict) -> None:
  """Rejects keys that default_config() does not have (a typo in an experiment file)."""
  known = default_config()

  def walk(node, ref, prefix):
    for key in node.keys():
      name = f"{prefix}{key}"
      if key not in ref:
        raise JaxllmError(_unknown_key_message(name, ref, prefix))
      if isinstance(node[key], ml_collections.ConfigDict):
        walk(node[key], ref[key], f"{name}.")

  walk(config, known, "")


def _unknown_key_message(name: str, ref: ml_collections.ConfigDict, prefix: str) -> str:
  if name in RENAMED:
    return f"config key '{name}' is now '{RENAMED[name]}' (one trainer for every task)"
  where = f"section '{prefix[:-1]}'" if prefix else "the config"
  return f"unknown config key '{name}' ({where} has: {', '.join(sorted(ref.keys()))})"


# Keys holding text for the model, where backslash escapes (\n, \t, \u2014) are what a shell
# line can't type otherwise; every other string (paths, regexes, URLs) is taken as typed.
ESCAPED_KEYS = frozenset({"train.sample_prompt", "data.separator"})


def _parse_value(text: str, current: Any, name: str) -> Any:
  if isinstance(current, bool):
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes"):
      return True
    if lowered in ("false", "0", "no"):
      return False
    raise JaxllmError(f"config key '{name}' takes true or false, got '{text}'")
  if isinstance(current, (int, float)):
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or (
        isinstance(current, int) and isinstance(value, float)):
      raise JaxllmError(
          f"config key '{name}' takes a{'n integer' if isinstance(current, int) else ' number'},"
          f" got '{text}'")
    return type(current)(value)
  if isinstance(current, str):
    if name in ESCAPED_KEYS:  # --config.train.sample_prompt='\n' is a newline
      return text.encode("latin-1", "backslashreplace").decode("unicode_escape")
    return text  # as typed: a regex's \b stays a word boundary, a Windows path its \
  try:  # None: the key takes whatever the text spells (an int, a float, a bool, a string).
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    lowered = text.lower()
    return {"true": True, "false": False, "none": None}.get(lowered, text)


# A value of the type each key defaulting to None takes, so overrides of it parse and check
# like any other key's ("model.bias=maybe" is an error, "model.n_kv_head=2" an integer).
_NONE_KEY_TYPES = {
    **{f"model.{k}": False for k in ("bias", "qkv_bias", "tie_embeddings", "qk_norm",
                                     "pre_norm")},
    **{f"model.{k}": 0 for k in ("n_layer", "n_head", "d_model", "context_length", "vocab_size",
                                 "mlp_hidden", "n_kv_head", "rope_original_context",
                                 "type_vocab_size")},
    **{f"model.{k}": 0.0 for k in ("layer_norm_epsilon", "rope_theta", "rope_scaling_factor",
                                   "rope_low_freq_factor", "rope_high_freq_factor")},
    **{f"model.{k}": "" for k in ("norm", "position", "mlp", "architecture")},
}


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
  """Applies `section.key=value` overrides in place; an unknown key is a JaxllmError."""
  for override in overrides:
    if "=" not in override:
      raise JaxllmError(f"config override '{override}' needs the form section.key=value")
    name, text = override.split("=", 1)
    if name in RENAMED:
      raise JaxllmError(_unknown_key_message(name, config, ""))
    parts = name.split(".")
    node, prefix = config, ""
    for part in parts[:-1]:
      if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
        raise JaxllmError(_unknown_key_message(prefix + part, node, prefix))
      node, prefix = node[part], f"{prefix}{part}."
    key = parts[-1]
    if key not in node or isinstance(node[key], ml_collections.ConfigDict):
      raise JaxllmError(_unknown_key_message(name, node, prefix))
    current = node[key] if node[key] is not None else _NONE_KEY_TYPES.get(name)
    value = _parse_value(text, current, name)
    with node.ignore_type():
      node[key] = value


# Model keys that say how the network runs, not what it is: a run started from another
# (train.init_from) or read back (`jaxllm eval`) sets them (stacked or per-layer parameters are
# read into either layout); the others are the stored architecture's.
RUNTIME_KEYS = ("dropout", "dtype", "matmul_dtype", "remat", "scan_layers")


def check_read_back_overrides(overrides: Sequence[str], workdir: Any) -> None:
  """Refuses an override of a finished run's architecture (model.* other than RUNTIME_KEYS):
  its parameters have that shape, so the key can't change when the run is read back."""
  for override in overrides:
    name = override.split("=", 1)[0]
    if name.startswith("model.") and name[len("model."):] not in RUNTIME_KEYS:
      raise JaxllmError(f"--config.{name}: the architecture of {workdir} is the one in its "
                        f"config.json; only model.{', model.'.join(RUNTIME_KEYS)} can be set "
                        f"when reading a run back")


def check_train(train: ml_collections.ConfigDict) -> None:
  """train.* values no run can use, as one-line errors before anything is built."""
  for key in ("batch_size", "grad_accum", "eval_batches", "muon_ns_steps"):
    if train[key] < 1:
      raise JaxllmError(f"train.{key} must be at least 1, got {train[key]}")
  for key in ("steps", "epochs", "eval_every", "log_every", "warmup_steps", "decay_steps",
              "muon_momentum_warmup_steps"):
    if train[key] < 0:
      raise JaxllmError(f"train.{key} must be 0 or more, got {train[key]}")
  if train.batch_size % train.grad_accum:
    raise JaxllmError(f"train.batch_size={train.batch_size} is not divisible by "
                      f"train.grad_accum={train.grad_accum}")
  _check_choice(train, "schedule", ("cosine", "constant", "wsd"))
  _check_choice(train, "decay_shape", ("linear", "1-sqrt"))
  _check_choice(train, "optimizer", ("adamw", "muon"))
  if not 0 < train.decay_fraction <= 1:
    raise JaxllmError(f"train.decay_fraction must be in (0, 1], got {train.decay_fraction}")
  if train.optimizer == "muon":
    _check_muon(train)
  if train.steps <= 0 and train.epochs <= 0:
    raise JaxllmError("set train.steps (or train.epochs) to a positive number")


def _check_choice(train: ml_collections.ConfigDict, key: str, valid: tuple[str, ...]) -> None:
  if train[key] not in valid:
    raise JaxllmError(f"train.{key} must be {', '.join(valid[:-1])} or {valid[-1]}, got "
                      f"'{train[key]}'")


def _check_muon(train: ml_collections.ConfigDict) -> None:
  if train.learning_rate <= 0:
    raise JaxllmError(f"train.optimizer=muon needs train.learning_rate > 0 (Muon's rate is its "
                      f"schedule's, scaled by muon_learning_rate / learning_rate), got "
                      f"{train.learning_rate}")
  for key in ("muon_momentum", "muon_momentum_start"):
    if not 0 <= train[key] < 1:
      raise JaxllmError(f"train.{key} must be in [0, 1), got {train[key]}")


def every(done: int, interval: int) -> bool:
  """Whether step `done` is one of every `interval` steps (interval 0: none)."""
  return interval > 0 and done % interval == 0


def to_dict(config: ml_collections.ConfigDict) -> dict:
  return config.to_dict()


def from_dict(values: dict) -> ml_collections.ConfigDict:
  """Rebuilds a config saved as JSON (config.json in a run directory) on top of the defaults."""
  config = default_config()
  values = _migrate(values)

  def merge(node, update, prefix):
    for key, value in update.items():
      if key not in node:
        raise JaxllmError(_unknown_key_message(prefix + key, node, prefix))
      if isinstance(node[key], ml_collections.ConfigDict):
        merge(node[key], value, f"{prefix}{key}.")
      else:
        with node.ignore_type():
          node[key] = value

  merge(config, values, "")
  return config


def _migrate(values: dict) -> dict:
  """A config.json written before the keys in RENAMED moved, in today's names."""
  values = {section: dict(keys) if isinstance(keys, dict) else keys
            for section, keys in values.items()}
  for old, new in RENAMED.items():
    old_section, old_key = old.split(".")
    if not isinstance(values.get(old_section), dict) or old_key not in values[old_section]:
      continue
    value = values[old_section].pop(old_key)
    new_section, new_key = new.split(".")
    if value not in ("", None):
      values.setdefault(new_section, {})[new_key] = value
  if values.get("finetune") == {}:
    del values["finetune"]
  return values


