"""Masked-language-model pretraining of an encoder (jaxllm/encoder.py), BERT's way: the
masking schedule and the loss, as pure functions.

Each batch is corrupted by `mask_tokens` with a key derived from (seed, step) only, so a
resumed run sees the same masks: every real, non-special token is selected with probability
15 %; a selected token becomes [MASK] 80 % of the time, a random vocabulary id 10 %, and stays
itself 10 % (Devlin et al. 2019, section 3.1). The loss is the cross-entropy of the original
token at the selected positions only.

(Not yet a `train.task`: the data, evaluation and report that make it one of the trainer's
tasks come next; these functions are what they will call.)

Shapes are in the names: B batch, L sequence, V vocabulary.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxllm.encoder import Encoder

SELECT_RATE, MASK_SHARE, RANDOM_SHARE = 0.15, 0.8, 0.1


def step_key(seed: int, step: int | jax.Array) -> jax.Array:
  """The masking key of a training step: a function of (seed, step), nothing else."""
  return jax.random.fold_in(jax.random.key(seed), step)


def mask_tokens(key: jax.Array, tokens_BxL: jax.Array, maskable_BxL: jax.Array, *,
                mask_id: int, vocab_size: int) -> tuple[jax.Array, jax.Array]:
  """(corrupted inputs BxL, selected BxL) for BERT's 15 % / 80-10-10 schedule.

  `maskable_BxL` is False on padding and special tokens ([CLS], [SEP], ...): never selected.
  """
  select_key, kind_key, random_key = jax.random.split(key, 3)
  selected_BxL = (jax.random.uniform(select_key, tokens_BxL.shape) < SELECT_RATE) & maskable_BxL
  kind_BxL = jax.random.uniform(kind_key, tokens_BxL.shape)
  random_BxL = jax.random.randint(random_key, tokens_BxL.shape, 0, vocab_size, tokens_BxL.dtype)
  inputs_BxL = jnp.where(kind_BxL < MASK_SHARE, jnp.asarray(mask_id, tokens_BxL.dtype),
                         jnp.where(kind_BxL < MASK_SHARE + RANDOM_SHARE, random_BxL, tokens_BxL))
  return jnp.where(selected_BxL, inputs_BxL, tokens_BxL), selected_BxL


def masked_lm_loss(params: Any, batch: dict[str, jax.Array], rng: jax.Array | None = None, *,
                   model: Encoder) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean cross-entropy over the selected positions of batch {"inputs", "targets", "mask",
  "selected"} (all BxL), and the masked-token accuracy."""
  deterministic = rng is None
  hidden_BxLxD = model.apply({"params": params}, batch["inputs"], batch["mask"],
                             deterministic=deterministic, method=model.encode,
                             rngs=None if deterministic else {"dropout": rng})
  logits_BxLxV = model.apply({"params": params}, hidden_BxLxD, method=model.mlm_logits)
  losses_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, batch["targets"])
  weights_BxL = batch["selected"].astype(jnp.float32)
  count = jnp.maximum(weights_BxL.sum(), 1.0)
  correct_BxL = (jnp.argmax(logits_BxLxV, axis=-1) == batch["targets"]).astype(jnp.float32)
  return (losses_BxL * weights_BxL).sum() / count, {
      "accuracy": (correct_BxL * weights_BxL).sum() / count}
