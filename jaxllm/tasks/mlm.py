"""Masked-language-model pretraining of an encoder (jaxllm/encoder.py), BERT's way.

Data is the `lm` task's: windows of a tokenized corpus (`config.data`), random or sliding, as
a function of (seed, step). Each window is corrupted by `mask_tokens` with a key derived from
(seed, step) only, so a resumed run sees the same masks: every real, non-special token is
selected with probability 15 %; a selected token becomes [MASK] 80 % of the time, a random
vocabulary id 10 %, and stays itself 10 % (Devlin et al. 2019, section 3.1). The loss is the
cross-entropy of the original token at the selected positions only; the figures are that
loss and the masked-token accuracy. The final report sets them against the unigram
baseline: predicting every masked token from the training split's token frequencies.

Tokenizers without a [MASK] token (char, tiktoken) get one id past their vocabulary.

Shapes are in the names: B batch, L sequence, V vocabulary, A microbatches, M their rows.
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxllm import data as data_lib
from jaxllm import encoder as encoder_lib
from jaxllm.encoder import Encoder
from jaxllm.errors import JaxllmError
from jaxllm.model import init_params, logical_axes
from jaxllm.tasks import common

SELECT_RATE, MASK_SHARE, RANDOM_SHARE = 0.15, 0.8, 0.1


def step_key(seed: int, step: int | jax.Array) -> jax.Array:
  """The masking key of a training step: a function of (seed, step), nothing else."""
  return jax.random.fold_in(jax.random.key(seed), step)


def mask_tokens(key: jax.Array, tokens_BxL: jax.Array, maskable_BxL: jax.Array, *,
                mask_id: int, vocab_size: int) -> tuple[jax.Array, jax.Array]:
  """(corrupted inputs BxL, selected BxL) for BERT's 15 % / 80-10-10 schedule (any leading
  shape). `maskable_BxL` is False on padding and special tokens ([CLS], [SEP], ...): never
  selected."""
  select_key, kind_key, random_key = jax.random.split(key, 3)
  selected_BxL = (jax.random.uniform(select_key, tokens_BxL.shape) < SELECT_RATE) & maskable_BxL
  kind_BxL = jax.random.uniform(kind_key, tokens_BxL.shape)
  random_BxL = jax.random.randint(random_key, tokens_BxL.shape, 0, vocab_size, tokens_BxL.dtype)
  inputs_BxL = jnp.where(kind_BxL < MASK_SHARE, jnp.asarray(mask_id, tokens_BxL.dtype),
                         jnp.where(kind_BxL < MASK_SHARE + RANDOM_SHARE, random_BxL, tokens_BxL))
  return jnp.where(selected_BxL, inputs_BxL, tokens_BxL), selected_BxL


def _logits(params: Any, batch: dict[str, jax.Array], rng: jax.Array | None, model: Encoder):
  deterministic = rng is None
  mask_BxL = batch.get("mask", jnp.ones(batch["inputs"].shape, bool))
  hidden_BxLxD = model.apply({"params": params}, batch["inputs"], mask_BxL,
                             deterministic=deterministic, method=model.encode,
                             rngs=None if deterministic else {"dropout": rng})
  return model.apply({"params": params}, hidden_BxLxD, method=model.mlm_logits)


def masked_lm_loss(params: Any, batch: dict[str, jax.Array], rng: jax.Array | None = None, *,
                   model: Encoder) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean cross-entropy over the selected positions of batch {"inputs", "targets",
  "selected"} (all BxL; "mask" BxL of real tokens, default all), and the masked-token
  accuracy. `rng` None: no dropout."""
  sums = masked_lm_sums(params, batch, rng, model=model)
  count = jnp.maximum(sums["count"], 1.0)
  return sums["loss"] / count, {"accuracy": sums["accuracy"] / count}


def masked_lm_sums(params: Any, batch: dict[str, jax.Array], rng: jax.Array | None = None, *,
                   model: Encoder) -> dict[str, jax.Array]:
  """Summed loss and correct predictions over the selected positions, and their count."""
  logits_BxLxV = _logits(params, batch, rng, model)
  losses_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, batch["targets"])
  weights_BxL = batch["selected"].astype(jnp.float32)
  correct_BxL = (jnp.argmax(logits_BxLxV, axis=-1) == batch["targets"]).astype(jnp.float32)
  return {"loss": (losses_BxL * weights_BxL).sum(), "accuracy": (correct_BxL * weights_BxL).sum(),
          "count": weights_BxL.sum()}


def selected_count(batch: dict[str, jax.Array]) -> jax.Array:
  """How many positions a microbatch's loss averages over (`train.train_step`'s weight)."""
  return jnp.sum(batch["selected"].astype(jnp.float32))


def unigram_baseline(train_ids: np.ndarray, val_ids: np.ndarray, vocab_size: int,
                     special: tuple[int, ...]) -> dict[str, float]:
  """Loss and accuracy of guessing each masked token from the training split's token
  frequencies (add-one smoothed), on the validation split's maskable tokens: what a model
  that ignores the context reaches."""
  keep_train = ~np.isin(train_ids, special)
  counts_V = np.bincount(train_ids[keep_train], minlength=vocab_size).astype(np.float64) + 1.0
  counts_V[list(special)] = 0.0
  log_p_V = np.log(counts_V / counts_V.sum(), where=counts_V > 0, out=np.full(vocab_size, -np.inf))
  val = val_ids[~np.isin(val_ids, special)]
  return {"unigram_loss": float(-log_p_V[val].mean()),
          "unigram_accuracy": float(np.mean(val == np.argmax(counts_V)))}


def make_task(config: ml_collections.ConfigDict) -> common.Task:
  common.check_lm_options(config)
  train = config.train
  tokens = common.token_data(config)
  model, tokenizer = common.backbone(config, tokens.tokenizer)
  if not isinstance(model, Encoder):
    raise JaxllmError("train.task=mlm trains an encoder: set model.architecture=bert (or a "
                      "bert-* preset); a GPT pretrains with train.task=lm")
  cfg = model.config
  special = encoder_lib.special_ids(tokenizer)
  corrupt = jax.jit(functools.partial(mask_tokens, mask_id=encoder_lib.mask_id(tokenizer),
                                      vocab_size=tokenizer.vocab_size))

  def masked(key: jax.Array, windows: np.ndarray) -> dict[str, np.ndarray]:
    inputs, selected = corrupt(key, windows, ~np.isin(windows, special))
    return {"inputs": np.asarray(inputs), "targets": windows,
            "selected": np.asarray(selected, np.float32)}

  batches = data_lib.train_batches(tokens.train, config.data, train.batch_size,
                                   cfg.context_length, seed=train.seed,
                                   microbatches=train.grad_accum)

  def train_batch(step, rows):
    # The whole batch's masks, then this process's rows: every process draws the same ones.
    batch = masked(step_key(train.seed, step), batches.batch(step)["inputs"])
    return batch if rows is None else {k: v[:, rows] for k, v in batch.items()}

  def eval_batches(split):
    # Fixed windows and fixed masks (key train.seed + 1, batch index): figures compare.
    split_tokens = tokens.train if split == "train" else tokens.val
    for i, batch in enumerate(data_lib.eval_batches(
        split_tokens, config.data, train.batch_size, cfg.context_length, train.eval_batches,
        seed=train.seed + 1)):
      yield common.pad_rows(masked(step_key(train.seed + 1, i), batch["inputs"]),
                            train.batch_size)

  def report(workdir: pathlib.Path, saved, summary):
    baseline = unigram_baseline(np.asarray(tokens.train), np.asarray(tokens.val),
                                cfg.vocab_size, special)
    print(f"unigram baseline on validation tokens: loss {baseline['unigram_loss']:.4f}, "
          f"accuracy {baseline['unigram_accuracy']:.4f}")
    return {**summary, **baseline}

  return common.Task(
      model=model, tokenizer=tokenizer,
      init_params=lambda: init_params(model, jax.random.split(jax.random.key(train.seed))[0]),
      param_axes=logical_axes(model),
      loss_fn=lambda params, batch, rng: masked_lm_loss(
          params, batch, rng if cfg.dropout > 0 else None, model=model),
      eval_fn=functools.partial(masked_lm_sums, model=model),
      train_batch=train_batch, eval_batches=eval_batches, token_key="inputs",
      export=lambda params: {"params": params}, report=report,
      weight_fn=selected_count,
      batches_per_epoch=getattr(batches, "batches_per_epoch", None),
      description=(f"{len(tokens.train):,} train / {len(tokens.val):,} validation tokens "
                   f"({config.data.dataset}, tokenizer {tokenizer.name}), "
                   f"{SELECT_RATE:.0%} masked ([MASK] id {encoder_lib.mask_id(tokenizer)})"))
