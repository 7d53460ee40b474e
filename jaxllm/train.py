"""The pure parts of training: train state, optimizer, loss, `train_step` and `eval_step`.

Everything here is a function of its inputs; the loop that feeds it data, logs and saves
lives in `jaxllm/loop.py`.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxllm.model import GPT


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # optimizer steps taken
  params: Any
  opt_state: Any
  rng: jax.Array  # dropout randomness; split once per step


def learning_rate_schedule(train: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup then cosine decay to min_learning_rate (nanoGPT's), or constant."""
  warmup = int(train.warmup_steps)
  # Start warmup at lr / (warmup + 1) rather than 0, so step 0 already moves (as nanoGPT does).
  start = train.learning_rate / (warmup + 1)
  if train.schedule == "constant":
    if warmup == 0:
      return optax.constant_schedule(train.learning_rate)
    return optax.join_schedules(
        [optax.linear_schedule(start, train.learning_rate, warmup),
         optax.constant_schedule(train.learning_rate)], [warmup])
  if train.schedule == "cosine":
    decay_steps = int(train.decay_steps) or total_steps
    return optax.warmup_cosine_decay_schedule(
        init_value=start, peak_value=train.learning_rate, warmup_steps=warmup,
        decay_steps=max(decay_steps, warmup + 1), end_value=train.min_learning_rate)
  raise ValueError(f"unknown schedule {train.schedule!r}")


def weight_decay_mask(params: Any) -> Any:
  """True for matrices (Dense kernels, embeddings): no decay on biases and LayerNorm scales."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: path[-1].key in ("kernel", "embedding"), params)


def make_optimizer(train: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """AdamW with global-norm clipping (train.grad_clip > 0) and decay on matrices only."""
  adamw = optax.adamw(
      learning_rate_schedule(train, total_steps), b1=train.beta1, b2=train.beta2, eps=1e-8,
      weight_decay=train.weight_decay, mask=weight_decay_mask)
  if train.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(train.grad_clip), adamw)
  return adamw


def create_train_state(params: Any, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params), rng=jax.random.key(seed))


def lm_loss(params: Any, batch: dict[str, jax.Array], rng: jax.Array | None, *, model: GPT,
            deterministic: bool = True) -> jax.Array:
  """Mean next-token cross-entropy of a batch {"inputs": BxL, "targets": BxL}."""
  rngs = None if deterministic else {"dropout": rng}
  logits_BxLxV = model.apply({"params": params}, batch["inputs"], deterministic=deterministic,
                             rngs=rngs)
  return optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, batch["targets"]).mean()


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: GPT,
               optimizer: optax.GradientTransformation) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step over a batch of shape AxBxL (A microbatches, averaged gradients).

  Accumulating inside the step keeps one call = one optimizer step, so schedules, logs and
  checkpoints all count the same steps.
  """
  rng, step_rng = jax.random.split(state.rng)
  deterministic = model.config.dropout == 0.0
  grad_fn = jax.value_and_grad(lm_loss)
  microbatches = batch["inputs"].shape[0]

  def accumulate(carry, index_and_batch):
    index, microbatch = index_and_batch
    loss, grads = grad_fn(state.params, microbatch, jax.random.fold_in(step_rng, index),
                          model=model, deterministic=deterministic)
    loss_sum, grad_sum = carry
    return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

  zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
  (loss_sum, grad_sum), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(microbatches), batch))
  loss = loss_sum / microbatches
  grads = jax.tree.map(lambda g: g / microbatches, grad_sum)

  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
  return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}


def eval_step(params: Any, batch: dict[str, jax.Array], *, model: GPT) -> tuple[jax.Array, jax.Array]:
  """Summed token losses and the token count of a BxL batch (partial batches weigh right).

  Optional batch["weights"] (BxL) weighs each token: 0 on padding rows (`data.pad_batch`).
  """
  logits_BxLxV = model.apply({"params": params}, batch["inputs"])
  losses_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, batch["targets"])
  weights_BxL = batch.get("weights", jnp.ones_like(losses_BxL))
  return (losses_BxL * weights_BxL).sum(), weights_BxL.sum()


def flops_per_token(model: GPT, n_params: int) -> float:
  """Training FLOPs per token: 6N + 12 * n_layer * d_model * context_length.

  The PaLM paper's convention (appendix B), as nanoGPT uses it: 6N for the forward and
  backward matmuls with the parameters (N without position embeddings), plus attention.
  """
  cfg = model.config
  n = n_params - cfg.context_length * cfg.d_model
  return 6 * n + 12 * cfg.n_layer * cfg.d_model * cfg.context_length
