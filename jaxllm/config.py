"""Run configuration: defaults, model presets, experiment files and command-line overrides.

An experiment is a Python file whose `get_config()` returns an `ml_collections.ConfigDict`,
usually `default_config()` with a few keys changed. Any key can be overridden from the
command line as `--config.<section>.<key>=<value>`; a key that does not exist is an error.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import pathlib
from typing import Any, Sequence

import jax
import ml_collections

from jaxllm.errors import JaxllmError

# Llama-family architecture: RMSNorm, rotary positions, SwiGLU, no biases, untied by default.
_LLAMA = dict(norm="rmsnorm", position="rope", mlp="swiglu", bias=False, tie_embeddings=False)

# name -> model keys. Sizes (n_layer, n_head, d_model, context_length) always; the others
# where they differ from GPT-2's defaults. vocab_size, where given, is the model's own; a
# tokenizer's vocabulary takes its place when the model is built from one.
PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-small": dict(n_layer=12, n_head=12, d_model=768, context_length=1024),
    "gpt2-medium": dict(n_layer=24, n_head=16, d_model=1024, context_length=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, d_model=1280, context_length=1024),
    "gpt2-xl": dict(n_layer=48, n_head=25, d_model=1600, context_length=1024),
    # CPU-sized models. gpt-nano is nanoGPT's CPU Shakespeare model.
    "gpt-nano": dict(n_layer=4, n_head=4, d_model=128, context_length=64),
    "gpt-micro": dict(n_layer=2, n_head=2, d_model=64, context_length=32),
    # gpt-nano's sizes with Llama's components and 2 kv heads (grouped-query attention).
    "llama-nano": dict(n_layer=4, n_head=4, d_model=128, context_length=64, n_kv_head=2,
                       mlp_hidden=352, **_LLAMA),
    # Open models, with the shapes of their Hugging Face config.json.
    "smollm2-135m": dict(n_layer=30, n_head=9, n_kv_head=3, d_model=576, mlp_hidden=1536,
                         context_length=8192, vocab_size=49152, rope_theta=100000.0,
                         **{**_LLAMA, "tie_embeddings": True}),
    "qwen2.5-0.5b": dict(n_layer=24, n_head=14, n_kv_head=2, d_model=896, mlp_hidden=4864,
                         context_length=32768, vocab_size=151936, rope_theta=1000000.0,
                         layer_norm_epsilon=1e-6, qkv_bias=True,
                         **{**_LLAMA, "tie_embeddings": True}),
    "llama-3.2-1b": dict(n_layer=16, n_head=32, n_kv_head=8, d_model=2048, mlp_hidden=8192,
                         context_length=131072, vocab_size=128256, rope_theta=500000.0,
                         rope_scaling_factor=32.0, rope_low_freq_factor=1.0,
                         rope_high_freq_factor=4.0, rope_original_context=8192,
                         **{**_LLAMA, "tie_embeddings": True}),
    # Encoders (model.architecture=bert, jaxllm/models/bert.py). bert-nano: gpt-nano's sizes with
    # a longer context; bert-base: Devlin et al.'s 110M model with its WordPiece vocabulary.
    "bert-nano": dict(architecture="bert", n_layer=4, n_head=4, d_model=128,
                      context_length=128),
    "bert-base": dict(architecture="bert", n_layer=12, n_head=12, d_model=768,
                      context_length=512, vocab_size=30522, layer_norm_epsilon=1e-12),
}
# The architecture used when neither a preset nor explicit sizes are given.
DEFAULT_PRESET = "gpt-nano"


def default_config() -> ml_collections.ConfigDict:
  """Every key jaxllm knows, with its default. Experiments start from this."""
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict()
  c.model.preset = ""  # a key of PRESETS; explicit sizes below override it
  # "gpt" (a causal decoder, jaxllm/models/gpt.py) or "bert" (a bidirectional encoder,
  # jaxllm/models/bert.py: tasks mlm and classify). None: the preset's, else gpt.
  c.model.architecture = None
  c.model.n_layer = None
  c.model.n_head = None
  c.model.d_model = None
  c.model.context_length = None
  c.model.vocab_size = None  # None: the tokenizer's vocabulary size
  c.model.dropout = 0.0
  # Architecture. None: the preset's value, else GPT-2's (given after the colon).
  c.model.bias = None  # biases in every Linear and LayerNorm: True
  c.model.qkv_bias = None  # biases of the q/k/v projections: same as bias
  c.model.tie_embeddings = None  # output projection = token embedding transposed: True
  c.model.norm = None  # "layernorm" or "rmsnorm": layernorm
  c.model.layer_norm_epsilon = None  # the norms' epsilon: 1e-5
  c.model.position = None  # "learned" (absolute embeddings) or "rope" (rotary): learned
  c.model.rope_theta = None  # rotary base: 10000.0
  # Llama 3's rotary frequency scaling; factor 0 = none: 0.0, 1.0, 4.0, 8192
  c.model.rope_scaling_factor = None
  c.model.rope_low_freq_factor = None
  c.model.rope_high_freq_factor = None
  c.model.rope_original_context = None
  c.model.mlp = None  # "gelu" (GPT-2's tanh approximation) or "swiglu": gelu
  c.model.mlp_hidden = None  # MLP hidden units: 4 * d_model (gelu); required for swiglu
  c.model.n_kv_head = None  # key/value heads (grouped-query attention; 1 = multi-query): n_head
  c.model.qk_norm = None  # RMSNorm over each head of q and k before attention (Qwen3): False
  # Encoders only. Segment (token-type) embeddings: 2; LayerNorm before each sublayer, with a
  # final one (GPT-2's order), instead of BERT's after each residual sum: False.
  c.model.type_vocab_size = None
  c.model.pre_norm = None
  # Compute dtype; parameters are float32 (bfloat16 computes on float32 parameters).
  # "float64" (parameters, optimizer state and all arithmetic; needs JAX_ENABLE_X64=1) is for
  # numerical checks: on every mesh its losses agree to ~1e-12 where float32's rounding,
  # summed in another order, can grow over hundreds of steps.
  c.model.dtype = "float32"
  # "bfloat16": every weight matmul takes bf16 operands and accumulates and returns float32,
  # forward and backward (jaxllm/models/matmul.py); the rest stays float32. 1.33x at GPT-2 small's
  # shapes on a CPU with bf16 dot instructions; losses within ~2e-3 of float32's.
  c.model.matmul_dtype = "float32"
  # Std of the token and position embeddings at init: GPT-2's 0.02, or 1.0 for PyTorch's
  # nn.Embedding default (what "Build a Large Language Model (From Scratch)" trains with).
  c.model.embedding_init_std = 0.02
  # Recompute each block's activations in the backward pass: "none", "full" (keep only the
  # block's input) or "dots" (keep the weight matmuls' outputs); less memory, more FLOPs.
  c.model.remat = "none"
  c.model.scan_layers = False  # stack the blocks under one nn.scan (params: "blocks", LxDx...)

  c.data = ml_collections.ConfigDict()
  c.data.dataset = "tiny_shakespeare"  # a TFDS catalog name, or "text" for local files
  # The corpus of every task. lm with dataset="text": a file, a directory of .txt files or a
  # glob; classify: labelled texts (SMSSpamCollection, .csv/.tsv with a header, .jsonl);
  # instruct: Alpaca records (.json list or .jsonl); dpo: the same with chosen/rejected.
  c.data.path = ""
  c.data.data_dir = ""  # TFDS data dir; "" = TFDS's default ($TFDS_DATA_DIR or ~/tensorflow_datasets)
  c.data.tokenizer = "gpt2"  # any tiktoken encoding name, or "char"
  c.data.train_split = "train"  # TFDS splits, joined with "+"
  c.data.val_split = ""  # "": carve val_fraction off the end of the training text
  c.data.val_fraction = 0.1
  c.data.separator = "<|endoftext|>"  # put between documents; "" joins them as they are
  c.data.sampling = "random"  # "random" offsets (nanoGPT) or "sliding" windows (the book)
  c.data.stride = 0  # sliding-window stride; 0 = context_length
  c.data.tokenize_workers = 0  # threads tokenizing a corpus into the cache; 0 = every core
  c.data.prefetch = 2  # training batches made and placed on the devices ahead; 0 = none

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000  # optimizer steps
  c.train.epochs = 0  # > 0: train this many passes over the sliding windows instead
  c.train.batch_size = 12  # sequences per optimizer step (all microbatches together)
  c.train.learning_rate = 1e-3
  c.train.min_learning_rate = 1e-4  # end of the cosine decay
  c.train.schedule = "cosine"  # "cosine" (linear warmup + cosine decay) or "constant"
  c.train.warmup_steps = 100
  c.train.decay_steps = 0  # 0 = steps
  c.train.weight_decay = 0.1  # applied to matrices (ndim >= 2) only
  c.train.beta1 = 0.9
  c.train.beta2 = 0.95
  c.train.grad_clip = 1.0  # global-norm clipping; 0 disables it
  c.train.grad_accum = 1  # microbatches per optimizer step
  c.train.eval_every = 250  # also evaluated before the first step and after the last; 0 = only then
  c.train.eval_batches = 20
  c.train.log_every = 10  # 0 = log only where the run evaluates
  c.train.seed = 1337
  c.train.peak_flops = 0.0  # per-device FLOP/s for MFU; 0 = measure a matmul at start-up
  c.train.sample_prompt = "\n"
  c.train.sample_tokens = 200  # the text sample at the end of pretraining; 0 = none
  # What the trainer optimises (jaxllm/tasks/): "lm" (next-token pretraining), "mlm" (an
  # encoder's masked-token pretraining), "classify", "instruct" (Alpaca-style instruction
  # tuning) or "dpo" (preference tuning).
  c.train.task = "lm"
  # A run directory (of `jaxllm train`, or made by `jaxllm convert` from GPT-2 weights) whose
  # parameters start this run; its config.json gives the architecture and its tokenizer.json
  # the tokenizer. "" = random init from `model`.
  c.train.init_from = ""
  # What trains, comma-separated: all, backbone, head, last_block, final_norm, embeddings, lora,
  # or a regex on parameter paths ("backbone/blocks_11/attn"). The book's ch. 6:
  # "head,last_block,final_norm".
  c.train.trainable = "all"

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 250  # save the train state every this many steps; 0 = only at the end
  c.checkpoint.keep = 3  # how many of the latest checkpoints to keep; 0 = all
  c.checkpoint.keep_best = 0  # also keep this many with the lowest val_loss (saved at eval steps)
  c.checkpoint["async"] = True  # write in a background thread while training goes on
  c.checkpoint.resume = True  # a --workdir holding checkpoints resumes from the latest

  # Devices as a (data, fsdp, tensor) grid; one size may be -1 (= the remaining devices).
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1  # data parallel: batch rows split, weights replicated
  c.mesh.fsdp = 1  # batch rows split and weights + optimizer state split (FSDP / ZeRO-3)
  c.mesh.tensor = 1  # heads, MLP units and vocabulary split (Megatron tensor parallel)
  # (logical axis, mesh axis or axes or None) pairs replacing those axes' rules in
  # jaxllm.training.sharding.DEFAULT_RULES, e.g. --config.mesh.rules="[('vocab', None)]".
  c.mesh.rules = ()

  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 0  # 0 = no LoRA; > 0 adds rank-r adapters (train them with trainable="lora")
  c.lora.alpha = 16.0  # adapters are scaled by alpha / rank
  # Kernels to adapt (attention and MLP, by GPT-2's and Llama's module names: what a model
  # lacks is skipped); add "head" for the class head (appendix E).
  c.lora.targets = "qkv,q,kv,out,fc,gate,up,proj"

  c.classifier = ml_collections.ConfigDict()
  c.classifier.format = "auto"  # auto (.csv, .jsonl, else tsv), tsv, csv or jsonl
  c.classifier.text_column = "text"  # header name / JSON key, or a 0-based index (no header)
  c.classifier.label_column = "label"
  c.classifier.labels = ""  # class names in class-id order, "ham,spam"; "" = sorted distinct labels
  c.classifier.balance = True  # downsample every class to the rarest class's count
  c.classifier.train_fraction = 0.7
  c.classifier.val_fraction = 0.1  # test = the rest
  c.classifier.max_length = 0  # pad/truncate to this many tokens; 0 = longest training text
  c.classifier.pad_id = -1  # -1 = the tokenizer's: [PAD], else <|endoftext|> (50256 for gpt2)
  c.classifier.seed = 123  # balancing and splitting (the book's random_state)
  # The hidden state the head reads: "last" real token (a decoder's: its causal attention has
  # seen the whole text), "cls" (an encoder's first token through its pooler, as BERT) or
  # "mean" over the real tokens. "" = last for GPT, cls for encoders.
  c.classifier.pooling = ""

  c.instruct = ml_collections.ConfigDict()
  c.instruct.template = "alpaca"  # prompt template: alpaca (the book's) or phi3
  c.instruct.train_fraction = 0.85  # the book's order: train, then test, then validation
  c.instruct.test_fraction = 0.1
  c.instruct.shuffle = False  # shuffle records (with train.seed) before splitting
  c.instruct.mask_prompt = False  # no loss on the prompt's tokens, only on the response
  c.instruct.max_length = 0  # truncate examples to this many tokens; 0 = context length
  c.instruct.pad_multiple = 16  # pad batches to a multiple of this: fewer shapes to compile
  c.instruct.bucket_batches = 20  # sort pools of this many batches by length; 0 = plain shuffle
  c.instruct.max_new_tokens = 256  # response length when generating for the test split
  c.instruct.generate_batch_size = 16

  # train.task=dpo (Rafailov et al. 2023, as the book's bonus chapter): data.path holds Alpaca
  # records with "chosen" and "rejected" responses; prompt, split and batching as `instruct`,
  # the prompt's tokens always masked; the reference model is train.init_from, frozen.
  c.dpo = ml_collections.ConfigDict()
  c.dpo.beta = 0.1  # how far the policy may move from the reference
  # Each response's log-probability as the mean over its tokens (the book), or the sum (the
  # paper).
  c.dpo.average_logprobs = True

  c.judge = ml_collections.ConfigDict()
  c.judge.url = ""  # OpenAI-compatible server scoring test responses (Ollama, vLLM); "" = off
  c.judge.model = "llama3"  # the judge model's name on that server
  c.judge.timeout = 120.0  # seconds per request
  return c


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
  for key in ("batch_size", "grad_accum", "eval_batches"):
    if train[key] < 1:
      raise JaxllmError(f"train.{key} must be at least 1, got {train[key]}")
  for key in ("steps", "epochs", "eval_every", "log_every", "warmup_steps", "decay_steps"):
    if train[key] < 0:
      raise JaxllmError(f"train.{key} must be 0 or more, got {train[key]}")
  if train.batch_size % train.grad_accum:
    raise JaxllmError(f"train.batch_size={train.batch_size} is not divisible by "
                      f"train.grad_accum={train.grad_accum}")
  if train.schedule not in ("cosine", "constant"):
    raise JaxllmError(f"train.schedule must be cosine or constant, got '{train.schedule}'")
  if train.steps <= 0 and train.epochs <= 0:
    raise JaxllmError("set train.steps (or train.epochs) to a positive number")


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
  mlp: str = "gelu"  # "gelu" | "swiglu"
  mlp_hidden: int = 0  # 0 = 4 * d_model
  n_kv_head: int = 0  # 0 = n_head
  qk_norm: bool = False

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
            "mlp": ("gelu", "swiglu"), "dtype": ("float32", "bfloat16", "float64"),
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
      qk_norm=bool(arch["qk_norm"]), **sizes)


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
                     embedding_init_std=0.02, remat="none", scan_layers=False)


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
