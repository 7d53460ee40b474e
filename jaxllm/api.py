"""jaxllm's public API, for notebooks and scripts; `jaxllm ...` on the command line is a thin
layer over the same functions. These names stay stable.

    import jaxllm

    config = jaxllm.load_config("experiments/shakespeare_char.py", ["train.steps=200"])
    figures = jaxllm.train(config, "runs/shakespeare")           # what `jaxllm train` prints
    run = jaxllm.load_run("runs/shakespeare")                    # config, model, params, tokenizer
    print(jaxllm.generate(run, "ROMEO:", max_new_tokens=100))

    jaxllm.convert("gpt2", "runs/gpt2-small")                    # or a Hugging Face folder
    jaxllm.convert("runs/gpt2-small", "hf/gpt2", to="hf")        # back to Hugging Face's format
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Sequence

import ml_collections

from jaxllm import config as config_lib
from jaxllm.data.tokenizer import Tokenizer
from jaxllm.errors import JaxllmError
from jaxllm.models.gpt import GPT
from jaxllm.serve import generate as generate_lib
from jaxllm.training import loop, rundir
from jaxllm.weights import convert as convert_lib


@dataclasses.dataclass(frozen=True)
class Run:
  """A finished run directory, read back: its config, network, parameters and tokenizer."""

  workdir: pathlib.Path
  config: ml_collections.ConfigDict
  model: GPT
  params: Any
  tokenizer: Tokenizer


def load_config(experiment: str | pathlib.Path,
                overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """An experiment file's config (experiments/<name>.py) with `overrides` applied, each
  `section.key=value` as after `--config.` on the command line."""
  config = config_lib.load_config(experiment)
  config_lib.apply_overrides(config, list(overrides))
  return config


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
          progress: bool = True) -> dict[str, Any]:
  """Trains what `config.train.task` names (pretraining or a finetune) into `workdir`,
  resuming from its checkpoints; returns the final figures (those of eval.json)."""
  return loop.run(config, workdir, progress=progress)


def load_run(workdir: str | pathlib.Path, overrides: Sequence[str] = ()) -> Run:
  """A run of `train` or `convert`; `overrides` (`model.matmul_dtype=bfloat16`, ...) change
  how its network runs."""
  config, model, params, tokenizer = rundir.load_run(workdir, overrides=list(overrides))
  return Run(pathlib.Path(workdir), config, model, params, tokenizer)


def generate(run: Run, prompt: str | list[str], max_new_tokens: int = 64, *,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             seed: int = 0) -> str | list[str]:
  """The completion of `prompt` (or of each of a list), KV-cached, stopping at the
  tokenizer's end-of-text token. temperature 0 is greedy."""
  if not isinstance(run.model, GPT):
    raise JaxllmError(f"{run.workdir} holds an encoder, which does not generate text; load "
                      f"a decoder's run")
  return generate_lib.generate_text(run.model, run.params, run.tokenizer, prompt,
                                    max_new_tokens=max_new_tokens, temperature=temperature,
                                    top_k=top_k, top_p=top_p, seed=seed)


def convert(source: str | pathlib.Path, out: str | pathlib.Path, to: str = "jaxllm",
            cache_dir: str | pathlib.Path | None = None) -> dict[str, Any]:
  """`to="jaxllm"`: a GPT-2 name (gpt2, gpt2-medium, ...; downloaded into `cache_dir`) or a
  folder of GPT-2 (Hugging Face or OpenAI's TF checkpoint), Llama, Qwen2, Mistral or BERT
  weights, written as a run directory. `to="hf"`: a jaxllm run written as a Hugging Face
  folder. Returns the model's sizes."""
  if to == "hf":
    return convert_lib.export_hf(source, out)
  if to != "jaxllm":
    raise JaxllmError(f"convert to 'jaxllm' or 'hf', not '{to}'")
  if str(source) in convert_lib.GPT2_NAMES and not pathlib.Path(source).is_dir():
    source = convert_lib.download(str(source), cache_dir)
  return convert_lib.import_checkpoint(source, out)
