"""The pure forward passes and losses of the finetuning tasks, shared by training and evaluation.

A finetuned model's parameters are one pytree `{"backbone": GPT params, "head": head params}`
plus, with LoRA, `"lora": adapters`, merged into the weights at the top of every forward
pass (`effective_params`), so the gradient reaches the adapters and nothing else needs to
know about them; DPO adds `"reference"`, a frozen copy of the starting backbone.

- classification: GPT hidden states -> the last real token -> a class head; or an encoder's
  hidden states -> its pooler on the first token, or their mean -> a class head.
- instruction: the GPT's own logits -> next-token cross-entropy weighted by
  `weights_BxL` (0 on padding and, optionally, on the prompt).
- preference (DPO): the policy's and the reference's log-probabilities of a chosen and a
  rejected response -> -log sigmoid(beta * (policy margin - reference margin)).

Every loss is `loss(params, batch, rng) -> (mean loss, aux means)`, as `train.train_step`
takes it; every `*_sums(params, batch)` gives evaluation sums with their "count".

Shapes are in the names: B batch, L sequence, D d_model, V vocabulary, C classes, P the pair
(chosen, rejected).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxllm.errors import JaxllmError
from jaxllm.models import bert as encoder_lib
from jaxllm.models import heads, lora
from jaxllm.models.bert import Encoder
from jaxllm.models.gpt import GPT

Params = dict[str, Any]


def effective_params(params: Params, lora_scale: float = 0.0) -> Params:
  """{"backbone", "head"} with any LoRA adapters merged into their kernels."""
  if "lora" not in params:
    return params
  plain = {k: v for k, v in params.items() if k != "lora"}
  return lora.merge(plain, params["lora"], lora_scale)


def hidden_states(backbone: GPT, backbone_params: Params, tokens_BxL: jax.Array,
                  rng: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
  rngs = None if deterministic else {"dropout": rng}
  hidden_BxLxD, _ = backbone.apply({"params": backbone_params}, tokens_BxL,
                                   deterministic=deterministic, rngs=rngs, method=backbone.encode)
  return hidden_BxLxD


POOLINGS = ("last", "cls", "mean")


def pooled(backbone: GPT | Encoder, backbone_params: Params, batch: dict[str, jax.Array],
           rng: jax.Array | None = None, deterministic: bool = True,
           pooling: str = "last") -> jax.Array:
  """One hidden state per row of {"tokens_BxL", "length_B"}, BxD: a GPT's at the last real
  token ("last"), or an encoder's over its real tokens (padding masked out as keys) through
  its pooler at the first token ("cls") or averaged ("mean")."""
  if not isinstance(backbone, Encoder):
    hidden_BxLxD = hidden_states(backbone, backbone_params, batch["tokens_BxL"], rng,
                                 deterministic)
    return heads.last_token(hidden_BxLxD, batch["length_B"])
  tokens_BxL = batch["tokens_BxL"]
  mask_BxL = jnp.arange(tokens_BxL.shape[1])[None, :] < batch["length_B"][:, None]
  variables = {"params": backbone_params}
  hidden_BxLxD = backbone.apply(variables, tokens_BxL, mask_BxL, deterministic=deterministic,
                                rngs=None if deterministic else {"dropout": rng},
                                method=backbone.encode)
  if pooling == "cls":
    return backbone.apply(variables, hidden_BxLxD, method=backbone.pool)
  return encoder_lib.mean_pool(hidden_BxLxD, mask_BxL)


def pooling(classifier, backbone: GPT | Encoder) -> str:
  """classifier.pooling for this backbone: "" means last for a GPT, cls for an encoder."""
  encoder = isinstance(backbone, Encoder)
  value = classifier.pooling or ("cls" if encoder else "last")
  allowed = POOLINGS[1:] if encoder else POOLINGS[:1]
  if value not in allowed:
    kind = "an encoder" if encoder else "a GPT (its causal attention sees the whole text " \
                                        "at the last token only)"
    raise JaxllmError(f"classifier.pooling='{value}' does not apply to {kind}: take "
                      f"{' or '.join(allowed)}")
  return value


def classifier_logits(params: Params, batch: dict[str, jax.Array], rng: jax.Array | None = None,
                      *, backbone: GPT | Encoder, lora_scale: float = 0.0,
                      deterministic: bool = True, pooling: str = "last") -> jax.Array:
  """Class logits BxC from each row's pooled state (`pooled`) of {"tokens_BxL", "length_B"}."""
  params = effective_params(params, lora_scale)
  return heads.classifier_apply(params["head"], pooled(
      backbone, params["backbone"], batch, rng, deterministic, pooling))


def classification_loss(params: Params, batch: dict[str, jax.Array], rng: jax.Array | None = None,
                        *, backbone: GPT | Encoder, lora_scale: float = 0.0,
                        deterministic: bool = True, pooling: str = "last"
                        ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean cross-entropy of the class head, and the batch's correct predictions."""
  logits_BxC = classifier_logits(params, batch, rng, backbone=backbone, lora_scale=lora_scale,
                                 deterministic=deterministic, pooling=pooling)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits_BxC, batch["label_B"]).mean()
  accuracy = jnp.mean(jnp.argmax(logits_BxC, axis=-1) == batch["label_B"])
  return loss, {"accuracy": accuracy}


def classification_sums(params: Params, batch: dict[str, jax.Array], *, backbone: GPT | Encoder,
                        lora_scale: float = 0.0, pooling: str = "last",
                        num_classes: int = 0) -> dict[str, jax.Array]:
  """Summed loss and correct predictions over the rows whose weight_B is 1 (not padding);
  with `num_classes`, also their "confusion" counts, CxC (rows true, columns predicted)."""
  logits_BxC = classifier_logits(params, batch, backbone=backbone, lora_scale=lora_scale,
                                 pooling=pooling)
  losses_B = optax.softmax_cross_entropy_with_integer_labels(logits_BxC, batch["label_B"])
  predicted_B = jnp.argmax(logits_BxC, axis=-1)
  weight_B = batch["weight_B"]
  sums = {"loss": jnp.sum(losses_B * weight_B),
          "accuracy": jnp.sum((predicted_B == batch["label_B"]) * weight_B),
          "count": jnp.sum(weight_B)}
  if num_classes:
    true_BxC = jax.nn.one_hot(batch["label_B"], num_classes) * weight_B[:, None]
    sums["confusion"] = true_BxC.T @ jax.nn.one_hot(predicted_B, num_classes)
  return sums


def token_losses(params: Params, batch: dict[str, jax.Array], rng: jax.Array | None = None,
                 *, backbone: GPT, lora_scale: float = 0.0,
                 deterministic: bool = True) -> jax.Array:
  """Next-token cross-entropy at every position of {"inputs_BxL", "targets_BxL"}: BxL.

  The logits are the GPT's own (its `logits` method, tied or not): the same matmul_dtype and
  the same sharding constraint as pretraining, one LM head for every task.
  """
  params = effective_params(params, lora_scale)
  rngs = None if deterministic else {"dropout": rng}
  logits_BxLxV = backbone.apply({"params": params["backbone"]}, batch["inputs_BxL"],
                                deterministic=deterministic, rngs=rngs)
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
  return jnp.sum(losses_BxL * weights_BxL) / jnp.maximum(jnp.sum(weights_BxL), 1.0), {}


def target_weight(batch: dict[str, jax.Array]) -> jax.Array:
  """How many targets an instruction batch's loss averages over (`train.train_step`'s weight)."""
  return jnp.sum(batch["weights_BxL"])


def instruction_sums(params: Params, batch: dict[str, jax.Array], *, backbone: GPT,
                     lora_scale: float = 0.0) -> dict[str, jax.Array]:
  """Summed loss over the weighted targets, and their count."""
  losses_BxL = token_losses(params, batch, backbone=backbone, lora_scale=lora_scale)
  return {"loss": jnp.sum(losses_BxL * batch["weights_BxL"]),
          "count": jnp.sum(batch["weights_BxL"])}


# --- Preference tuning (DPO) ---------------------------------------------------------------


def sequence_logprobs(backbone_params: Params, batch: dict[str, jax.Array], rng=None, *,
                      backbone: GPT, average: bool = True,
                      deterministic: bool = True) -> jax.Array:
  """Log-probability of each response, BxP: its weighted targets' log-probs summed, or
  averaged over them (`average`, the book's choice)."""
  inputs_BxPxL = batch["inputs_BxPxL"]
  flat = {"inputs_BxL": inputs_BxPxL.reshape(-1, inputs_BxPxL.shape[-1]),
          "targets_BxL": batch["targets_BxPxL"].reshape(-1, inputs_BxPxL.shape[-1])}
  losses_NxL = token_losses({"backbone": backbone_params}, flat, rng, backbone=backbone,
                            deterministic=deterministic)
  weights_BxPxL = batch["weights_BxPxL"]
  logprob_BxP = -jnp.sum(losses_NxL.reshape(weights_BxPxL.shape) * weights_BxPxL, axis=-1)
  if average:
    logprob_BxP = logprob_BxP / jnp.maximum(jnp.sum(weights_BxPxL, axis=-1), 1.0)
  return logprob_BxP


def _dpo_terms(params, batch, rng, backbone, beta, average, lora_scale, deterministic):
  """Per-pair DPO losses and the implicit rewards of the chosen and rejected responses."""
  params = effective_params(params, lora_scale)
  policy_BxP = sequence_logprobs(params["backbone"], batch, rng, backbone=backbone,
                                 average=average, deterministic=deterministic)
  reference_BxP = jax.lax.stop_gradient(sequence_logprobs(
      params["reference"], batch, backbone=backbone, average=average))
  rewards_BxP = policy_BxP - reference_BxP  # log pi/pi_ref: beta x the implicit reward
  margin_B = rewards_BxP[:, 0] - rewards_BxP[:, 1]
  return -jax.nn.log_sigmoid(beta * margin_B), rewards_BxP


def dpo_loss(params: Params, batch: dict[str, jax.Array], rng: jax.Array | None = None, *,
             backbone: GPT, beta: float, average: bool = True, lora_scale: float = 0.0,
             deterministic: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean DPO loss of a batch of (chosen, rejected) pairs, with the reward figures the book
  logs: chosen and rejected rewards, their margin, and how often chosen wins."""
  losses_B, rewards_BxP = _dpo_terms(params, batch, rng, backbone, beta, average, lora_scale,
                                     deterministic)
  return losses_B.mean(), jax.tree.map(jnp.mean, _reward_figures(rewards_BxP))


def _reward_figures(rewards_BxP: jax.Array) -> dict[str, jax.Array]:
  return {"chosen_reward": rewards_BxP[:, 0], "rejected_reward": rewards_BxP[:, 1],
          "reward_margin": rewards_BxP[:, 0] - rewards_BxP[:, 1],
          "reward_accuracy": (rewards_BxP[:, 0] > rewards_BxP[:, 1]).astype(jnp.float32)}


def dpo_sums(params: Params, batch: dict[str, jax.Array], *, backbone: GPT, beta: float,
             average: bool = True, lora_scale: float = 0.0) -> dict[str, jax.Array]:
  """Summed DPO loss and reward figures over the pairs whose weight_B is 1, and their count."""
  losses_B, rewards_BxP = _dpo_terms(params, batch, None, backbone, beta, average, lora_scale,
                                     True)
  weight_B = batch["weight_B"]
  sums = {name: jnp.sum(value_B * weight_B)
          for name, value_B in {"loss": losses_B, **_reward_figures(rewards_BxP)}.items()}
  return {**sums, "count": jnp.sum(weight_B)}
