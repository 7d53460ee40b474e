"""What every weight converter shares: one-line errors for config files and tensor sets."""

from __future__ import annotations

import json
import pathlib

from jaxllm.errors import JaxllmError


def named(names: list[str], shown: int = 3) -> str:
  """"'a', 'b', 'c' and 4 more": a few of a long list of names, then how many more."""
  listed = ", ".join(f"'{name}'" for name in names[:shown])
  return listed + (f" and {len(names) - shown} more" if len(names) > shown else "")


def check_tensors(tensors: dict, shapes: dict[str, tuple], source, config, what: str,
                  harmless=lambda name: False) -> None:
  """One-line errors unless `tensors` holds every name of `shapes` in that shape (None: any
  size) and nothing else but what `harmless` accepts (buffers, tied copies): a tensor left
  over would be dropped from the converted model without a word."""
  for name, want in shapes.items():
    if name not in tensors:
      raise JaxllmError(f"{source} lacks '{name}', which {config} implies; the checkpoint is "
                        f"incomplete, or {config} describes another size")
    have = tuple(tensors[name].shape)
    if len(have) != len(want) or any(w not in (None, h) for h, w in zip(have, want)):
      raise JaxllmError(f"{source}: '{name}' has shape {list(have)} but {config} implies "
                        f"[{', '.join('*' if w is None else str(w) for w in want)}]; the "
                        f"checkpoint and its config disagree")
  extra = sorted(name for name in tensors if name not in shapes and not harmless(name))
  if extra:
    count = f"{len(extra)} tensor{'s' if len(extra) > 1 else ''}"
    raise JaxllmError(f"{source} holds {count} that {what} has not ({named(extra)}); convert "
                      f"a {what} checkpoint (those tensors would be dropped)")


def required(config: dict, keys, path) -> None:
  """A one-line error naming the first of `keys` a config file lacks."""
  for key in keys:
    if key not in config:
      raise JaxllmError(f"{path} lacks '{key}' (it needs {', '.join(keys)}); copy "
                        f"{pathlib.Path(path).name} again from the model's repository")


def read_json(path: pathlib.Path, what: str) -> dict:
  if not path.is_file():
    raise JaxllmError(f"{path} not found ({what})")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise JaxllmError(f"{path} is not valid JSON ({e})") from e


def check_hf_expressible(cfg, workdir) -> None:
  """A one-line error for the first architecture key (the GPT-2 speedrun's) that Hugging
  Face's GPT-2 and Llama models cannot express; zero_init_proj is only an initialisation."""
  family = "Llama" if (cfg.norm == "rmsnorm" or cfg.position == "rope") else "GPT-2"
  refused = [
      ("mlp", cfg.mlp == "relu2", "relu2", f"{family}'s MLP is "
       f"{'SwiGLU' if family == 'Llama' else 'GELU (gelu_new)'}", "gelu or swiglu"),
      ("logit_softcap", cfg.logit_softcap > 0, cfg.logit_softcap, "its logits are uncapped", 0),
      ("x0_shortcut", cfg.x0_shortcut, "true", "its blocks have no x0 shortcut", "false"),
      ("value_residual", cfg.value_residual, "true", "its attention has no value residual",
       "false"),
  ]
  for key, on, value, reason, fix in refused:
    if on:
      raise JaxllmError(f"{workdir}: model.{key}={value} cannot be exported to Hugging Face "
                        f"{family} ({reason}); train with model.{key}={fix} to export, or "
                        f"use the run directory itself (jaxllm generate, serve and eval read it)")
