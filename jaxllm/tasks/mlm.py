"""Masked-language-model pretraining of an encoder (jaxllm/models/bert.py), BERT's way.

Data is the `lm` task's: windows of a tokenized corpus (`config.data`), random or sliding, as
a function of (seed, step). Each window is corrupted by `mask_tokens`: every real, non-special
token is selected with probability 15 %; a selected token becomes [MASK] 80 % of the time, a
random vocabulary id 10 %, and stays itself 10 % (Devlin et al. 2019, section 3.1). The loss
is the cross-entropy of the original token at the selected positions only; the figures are
that loss and the masked-token accuracy. The final report sets them against the unigram
baseline: every masked token guessed from token frequencies, counted on the training split's
evaluation windows and scored on the validation split's.

Masks are drawn inside the jitted train and evaluation steps (`mask_batch`): a batch leaves
the host as clean windows plus, per row, the step and the row's place in the global batch,
and each row's key is (seed, step, row) only. So a resumed run sees the same masks, a process
that holds some rows draws them as a single process would, microbatches (train.grad_accum)
leave each window's mask as it was, and nothing goes to a device and back to the host to
be masked.

Tokenizers without a [MASK] token (char, tiktoken) get one id past their vocabulary.

Shapes are in the names: B batch, L sequence, V vocabulary, A microbatches, M their rows.
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxllm import data as data_lib
from jaxllm.errors import JaxllmError
from jaxllm.models import bert as encoder_lib
from jaxllm.models.bert import Encoder
from jaxllm.models.gpt import init_params, logical_axes
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


def mask_batch(batch: dict[str, jax.Array], *, seed: int, special: tuple[int, ...],
               mask_id: int, vocab_size: int) -> dict[str, jax.Array]:
  """The masked-LM batch {"inputs", "targets", "selected"} of the clean windows
  {"tokens_BxL", "step_B", "row_B"; "real_B" False on padding rows, default all real}: row b
  masked with key fold_in(step_key(seed, step_B[b]), row_B[b]), so its mask does not depend
  on which other rows are in the batch."""
  tokens_BxL = batch["tokens_BxL"]
  keys_B = jax.vmap(lambda step, row: jax.random.fold_in(step_key(seed, step), row))(
      batch["step_B"], batch["row_B"])
  maskable_BxL = ~jnp.isin(tokens_BxL, jnp.asarray(special, tokens_BxL.dtype))
  if "real_B" in batch:
    maskable_BxL &= batch["real_B"][:, None]
  inputs_BxL, selected_BxL = jax.vmap(functools.partial(
      mask_tokens, mask_id=mask_id, vocab_size=vocab_size))(keys_B, tokens_BxL, maskable_BxL)
  return {"inputs": inputs_BxL, "targets": tokens_BxL, "selected": selected_BxL}


def window_batch(windows: np.ndarray, step: int, rows: np.ndarray) -> dict[str, np.ndarray]:
  """`mask_batch`'s input: `windows` (... x L) at global batch rows `rows` (...) of `step`."""
  return {"tokens_BxL": windows, "step_B": np.full(rows.shape, step, np.int32),
          "row_B": rows.astype(np.int32)}


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


def unigram_baseline(train_batches: Iterable[np.ndarray], val_batches: Iterable[np.ndarray],
                     vocab_size: int, special: tuple[int, ...]) -> dict[str, float]:
  """Loss and accuracy of guessing each masked token from token frequencies counted on
  `train_batches` (add-one smoothed), over the maskable tokens of `val_batches`: what a model
  that ignores the context reaches. Batches are arrays of ids, read one at a time."""
  counts_V = np.zeros(vocab_size, np.float64)
  for ids in train_batches:
    ids = np.ravel(ids)
    counts_V += np.bincount(ids[~np.isin(ids, special)], minlength=vocab_size)
  counts_V += 1.0
  counts_V[list(special)] = 0.0
  log_p_V = np.log(counts_V / counts_V.sum(), where=counts_V > 0, out=np.full(vocab_size, -np.inf))
  guess = np.argmax(counts_V)
  loss, correct, count = 0.0, 0, 0
  for ids in val_batches:
    ids = np.ravel(ids)
    ids = ids[~np.isin(ids, special)]
    loss -= log_p_V[ids].sum()
    correct += int(np.sum(ids == guess))
    count += len(ids)
  return {"unigram_loss": float(loss / count), "unigram_accuracy": float(correct / count)}


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
  masks = functools.partial(mask_batch, special=special, mask_id=encoder_lib.mask_id(tokenizer),
                            vocab_size=tokenizer.vocab_size)
  train_masks, eval_masks = (functools.partial(masks, seed=seed)
                             for seed in (train.seed, train.seed + 1))
  batches = data_lib.train_batches(tokens.train, config.data, train.batch_size,
                                   cfg.context_length, seed=train.seed,
                                   microbatches=train.grad_accum)
  rows_AxM = np.arange(train.batch_size).reshape(train.grad_accum, -1)

  def train_batch(step, rows):
    windows = batches.batch(step, rows=rows)["inputs"]
    return window_batch(windows, step, rows_AxM if rows is None else rows_AxM[:, rows])

  def eval_windows(split):
    # Fixed windows, masked with key train.seed + 1 and the batch index: figures compare.
    return data_lib.eval_batches(tokens.train if split == "train" else tokens.val, config.data,
                                 train.batch_size, cfg.context_length, train.eval_batches,
                                 seed=train.seed + 1)

  def eval_batches(split):
    for i, batch in enumerate(eval_windows(split)):
      rows = len(batch["inputs"])
      yield common.pad_rows({**window_batch(batch["inputs"], i, np.arange(rows)),
                             "real_B": np.ones(rows, bool)}, train.batch_size)

  def report(workdir: pathlib.Path, saved, summary):
    baseline = unigram_baseline((b["inputs"] for b in eval_windows("train")),
                                (b["inputs"] for b in eval_windows("val")), cfg.vocab_size,
                                special)
    print(f"unigram baseline on validation tokens: loss {baseline['unigram_loss']:.4f}, "
          f"accuracy {baseline['unigram_accuracy']:.4f}")
    return {**summary, **baseline}

  return common.Task(
      model=model, tokenizer=tokenizer,
      init_params=lambda: init_params(model, jax.random.split(jax.random.key(train.seed))[0]),
      param_axes=logical_axes(model),
      loss_fn=lambda params, batch, rng: masked_lm_loss(
          params, train_masks(batch), rng if cfg.dropout > 0 else None, model=model),
      eval_fn=lambda params, batch: masked_lm_sums(params, eval_masks(batch), model=model),
      train_batch=train_batch, eval_batches=eval_batches, token_key="tokens_BxL",
      export=lambda params: {"params": params}, report=report,
      weight_fn=lambda batch: selected_count(train_masks(batch)),
      batches_per_epoch=getattr(batches, "batches_per_epoch", None),
      description=(f"{len(tokens.train):,} train / {len(tokens.val):,} validation tokens "
                   f"({config.data.dataset}, tokenizer {tokenizer.name}), "
                   f"{SELECT_RATE:.0%} masked ([MASK] id {encoder_lib.mask_id(tokenizer)})"))
