"""The pure forward passes and losses of the finetuning tasks, shared by training and evaluation.

A finetuned model's parameters are one pytree `{"backbone": GPT params, "head": head params}`
plus, with LoRA, `"lora": adapters`, merged into the weights at the top of every forward
pass (`effective_params`), so the gradient reaches the adapters and nothing else needs to
know about them.

- classification: GPT hidden states -> the last real token -> a class head.
- instruction: GPT hidden states -> the LM head -> next-token cross-entropy weighted by
  `weights_BxL` (0 on padding and, optionally, on the prompt).

Shapes are in the names: B batch, L sequence, D d_model, V vocabulary, C classes.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxllm import heads
from jaxllm import lora
from jaxllm.model import GPT

Params = dict[str, Any]


def effective_params(params: Params, lora_scale: float = 0.0) -> Params:
  """{"backbone", "head"} with any LoRA adapters merged into their kernels."""
  if "lora" not in params:
    return params
  plain = {"backbone": params["backbone"], "head": params["head"]}
  return lora.merge(plain, params["lora"], lora_scale)


def hidden_states(backbone: GPT, backbone_params: Params, tokens_BxL: jax.Array,
                  rng: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
  rngs = None if deterministic else {"dropout": rng}
  hidden_BxLxD, _ = backbone.apply({"params": backbone_params}, tokens_BxL,
                                   deterministic=deterministic, rngs=rngs, method=backbone.encode)
  return hidden_BxLxD


def classifier_logits(params: Params, batch: dict[str, jax.Array], rng: jax.Array | None = None,
                      *, backbone: GPT, lora_scale: float = 0.0,
                      deterministic: bool = True) -> jax.Array:
  """Class logits BxC from the last real token of each row of {"tokens_BxL", "length_B"}."""
  params = effective_params(params, lora_scale)
  hidden_BxLxD = hidden_states(backbone, params["backbone"], batch["tokens_BxL"], rng,
                               deterministic)
  last_BxD = heads.last_token(hidden_BxLxD, batch["length_B"])
  return heads.classifier_apply(params["head"], last_BxD)


def classification_loss(params: Params, batch: dict[str, jax.Array], rng: jax.Array | None = None,
                        *, backbone: GPT, lora_scale: float = 0.0, deterministic: bool = True
                        ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean cross-entropy of the class head, and the batch's correct predictions."""
  logits_BxC = classifier_logits(params, batch, rng, backbone=backbone, lora_scale=lora_scale,
                                 deterministic=deterministic)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits_BxC, batch["label_B"]).mean()
  correct = jnp.sum(jnp.argmax(logits_BxC, axis=-1) == batch["label_B"])
  return loss, {"correct": correct}


def token_losses(params: Params, batch: dict[str, jax.Array], rng: jax.Array | None = None,
                 *, backbone: GPT, lora_scale: float = 0.0,
                 deterministic: bool = True) -> jax.Array:
  """Next-token cross-entropy at every position of {"inputs_BxL", "targets_BxL"}: BxL."""
  params = effective_params(params, lora_scale)
  hidden_BxLxD = hidden_states(backbone, params["backbone"], batch["inputs_BxL"], rng,
                               deterministic)
  logits_BxLxV = heads.lm_apply(heads.lm_params(params["backbone"]), hidden_BxLxD)
  return optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, batch["targets_BxL"])


def instruction_loss(params: Params, batch: dict[str, jax.Array], rng: jax.Array | None = None,
                     *, backbone: GPT, lora_scale: float = 0.0, deterministic: bool = True
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean cross-entropy over the weighted (real, unmasked) targets of a batch.

  Masked positions are multiplied by an exact 0 before the sum, so they contribute exactly
  nothing to the loss or its gradient (as the book's ignore_index=-100 does).
  """
  losses_BxL = token_losses(params, batch, rng, backbone=backbone, lora_scale=lora_scale,
                            deterministic=deterministic)
  weights_BxL = batch["weights_BxL"]
  count = jnp.sum(weights_BxL)
  return jnp.sum(losses_BxL * weights_BxL) / jnp.maximum(count, 1.0), {"tokens": count}
