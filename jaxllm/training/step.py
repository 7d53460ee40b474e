"""The pure parts of training: train state, optimizer, loss, `train_step` and `eval_step`.

Everything here is a function of its inputs; the loop that feeds it data, logs and saves
lives in `jaxllm/loop.py`.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxllm.models.gpt import GPT
from jaxllm.training import muon as muon_lib


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
  if train.schedule == "wsd":
    return _warmup_stable_decay(train, int(train.decay_steps) or total_steps, start)
  raise ValueError(f"unknown schedule {train.schedule!r}")


def _warmup_stable_decay(train: ml_collections.ConfigDict, horizon: int,
                         start: float) -> optax.Schedule:
  """Warmup as the other schedules, the peak rate, then over the last decay_fraction of the
  `horizon` steps a decay to min_learning_rate, reached at step `horizon`: linear, or 1-sqrt
  (Hägele et al. 2024: peak - (peak - min) * sqrt(progress))."""
  peak, floor, warmup = train.learning_rate, train.min_learning_rate, int(train.warmup_steps)
  decay = max(1, round(float(train.decay_fraction) * horizon))
  begin = horizon - decay

  def schedule(count):
    step = jnp.asarray(count)
    progress = jnp.clip((step - begin) / decay, 0.0, 1.0)
    if train.decay_shape == "1-sqrt":
      progress = jnp.sqrt(progress)
    rate = peak * (1 - progress) + floor * progress  # both ends exact
    if warmup:  # a warmup running into the decay ends where the decay has got to
      rate = jnp.minimum(rate, start + (peak - start) * jnp.minimum(step / warmup, 1.0))
    return rate

  return schedule


def weight_decay_mask(params: Any) -> Any:
  """True for matrices (Dense kernels, embeddings): no decay on biases and LayerNorm scales."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: path[-1].key in ("kernel", "embedding"), params)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """Scales the updates by min(1, max_norm / global norm): optax.clip_by_global_norm with one
  scalar factor instead of a division per element.

  The result differs from optax's `g / norm * max_norm` by float rounding only (parameters
  within 1e-8 after a few GPT-2-small steps), but XLA:CPU materialises optax's divided
  gradients as a pass of their own, while a scalar multiply fuses into AdamW's one pass:
  the whole update at GPT-2 small's 124M parameters takes 79 instead of 240 ms.
  """

  def update(updates, state, params=None):
    del params
    norm = optax.tree.norm(updates)
    scale = jnp.where(norm < max_norm, 1.0, max_norm / norm)
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

  return optax.GradientTransformation(optax.init_empty_state, update)


def _adamw(train: ml_collections.ConfigDict, schedule: optax.Schedule
           ) -> optax.GradientTransformation:
  return optax.adamw(schedule, b1=train.beta1, b2=train.beta2, eps=1e-8,
                     weight_decay=train.weight_decay, mask=weight_decay_mask)


def make_optimizer(train: ml_collections.ConfigDict, total_steps: int,
                   trainable: Any = None, schedule: optax.Schedule | None = None
                   ) -> optax.GradientTransformation:
  """AdamW with global-norm clipping (train.grad_clip > 0) and decay on matrices only; or,
  with train.optimizer=muon, Muon for the blocks' hidden matrices (`muon_optimizer`).

  `trainable` (a pytree of bools like the params, None = all) freezes the False leaves:
  they get no optimizer state and never move. `schedule` replaces train's learning-rate
  schedule (vectorised trials read theirs from a table); beta1, beta2 and weight_decay may
  be traced arrays.
  """
  schedule = schedule or learning_rate_schedule(train, total_steps)
  if getattr(train, "optimizer", "adamw") == "muon":
    return muon_optimizer(train, schedule, trainable)
  adamw = _adamw(train, schedule)
  if train.grad_clip > 0:
    adamw = optax.chain(clip_by_global_norm(train.grad_clip), adamw)
  if trainable is None or all(jax.tree.leaves(trainable)):
    return adamw
  labels = jax.tree.map(lambda t: "train" if t else "freeze", trainable)
  return optax.multi_transform({"train": adamw, "freeze": optax.set_to_zero()}, labels)


def muon_optimizer(train: ml_collections.ConfigDict, schedule: optax.Schedule,
                   trainable: Any = None) -> optax.GradientTransformation:
  """Global-norm clipping of the whole gradient, then Muon (jaxllm/training/muon.py) on the
  blocks' hidden matrices at `schedule` x muon_learning_rate / learning_rate, and on every
  other trained leaf the adamw optimizer's AdamW at `schedule`."""
  ratio = train.muon_learning_rate / train.learning_rate
  transforms = {"muon": muon_lib.muon(train, lambda count: schedule(count) * ratio),
                "adam": _adamw(train, schedule), "freeze": optax.set_to_zero()}
  optimizer = optax.multi_transform(
      transforms, lambda params: muon_lib.labels(params, trainable))
  if train.grad_clip > 0:
    optimizer = optax.chain(clip_by_global_norm(train.grad_clip), optimizer)
  return optimizer


def create_train_state(params: Any, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params), rng=jax.random.key(seed))


def lm_loss(params: Any, batch: dict[str, jax.Array], rng: jax.Array | None, *, model: GPT,
            deterministic: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean next-token cross-entropy of a batch {"inputs": BxL, "targets": BxL}."""
  rngs = None if deterministic else {"dropout": rng}
  logits_BxLxV = model.apply({"params": params}, batch["inputs"], deterministic=deterministic,
                             rngs=rngs)
  losses_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, batch["targets"])
  return losses_BxL.mean(), {}


def rows_weight(batch: dict[str, jax.Array]) -> jax.Array:
  """A microbatch's weight when its loss is a mean over rows (or over equal-length rows)."""
  return jnp.asarray(jax.tree.leaves(batch)[0].shape[0], jnp.float32)


def train_step(state: TrainState, batch: dict[str, jax.Array], *, loss_fn: Callable,
               optimizer: optax.GradientTransformation, weight_fn: Callable = rows_weight,
               trainable: Any = None) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step of `loss_fn(params, microbatch, rng) -> (loss, aux)` over a batch
  whose arrays have a leading microbatch axis A.

  Each microbatch's loss is a mean over its `weight_fn(microbatch)` items (tokens, rows,
  pairs), so gradients and aux means are combined with weights w_a / sum(w): the whole
  batch's mean, also when its items split unevenly (loss-masked tokens). Gradients are taken
  for the `trainable` leaves only (None: all); the frozen ones cost nothing. Accumulating
  inside the step keeps one call = one optimizer step, so schedules, logs and checkpoints all
  count the same steps.
  """
  rng, step_rng = jax.random.split(state.rng)
  leaves, treedef = jax.tree.flatten(state.params)
  mask = [True] * len(leaves) if trainable is None else jax.tree.leaves(trainable)

  def loss_of_trained(trained, microbatch, microbatch_rng):
    rest = iter(trained)
    params = treedef.unflatten([next(rest) if t else p for p, t in zip(leaves, mask)])
    return loss_fn(params, microbatch, microbatch_rng)

  grad_fn = jax.value_and_grad(loss_of_trained, has_aux=True)
  trained = [p for p, t in zip(leaves, mask) if t]
  weights_A = jax.lax.map(weight_fn, batch)
  total = jnp.sum(weights_A)
  scales_A = jnp.where(total > 0, weights_A / jnp.where(total > 0, total, 1.0), 0.0)

  def accumulate(carry, xs):
    index, microbatch, scale = xs
    (loss, aux), grads = grad_fn(trained, microbatch, jax.random.fold_in(step_rng, index))
    metrics = {"loss": loss, **aux}
    metric_sums, grad_sums = carry
    return (jax.tree.map(lambda acc, x: acc + scale * x.astype(acc.dtype), metric_sums,
                         metrics),
            [acc + scale * g for acc, g in zip(grad_sums, grads)]), None

  first = jax.tree.map(lambda x: x[0], batch)
  loss_shape, aux_shape = jax.eval_shape(loss_fn, state.params, first, step_rng)
  zeros = (jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.promote_types(x.dtype, jnp.float32)),
                        {"loss": loss_shape, **aux_shape}),
           [jnp.zeros_like(p) for p in trained])
  (metrics, grad_sums), _ = jax.lax.scan(
      accumulate, zeros, (jnp.arange(weights_A.shape[0]), batch, scales_A))
  sums = iter(grad_sums)
  grads = treedef.unflatten([next(sums) if t else jnp.zeros_like(p) for p, t in zip(leaves, mask)])
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
  return new_state, {**metrics, "grad_norm": optax.tree.norm(grad_sums)}


def eval_step(params: Any, batch: dict[str, jax.Array], *, model: GPT) -> tuple[jax.Array, jax.Array]:
  """Summed token losses and the token count of a BxL batch (partial batches weigh right).

  Optional batch["weights"] (BxL) weighs each token: 0 on padding rows (`data.pad_batch`).
  """
  logits_BxLxV = model.apply({"params": params}, batch["inputs"])
  losses_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, batch["targets"])
  weights_BxL = batch.get("weights", jnp.ones_like(losses_BxL))
  return (losses_BxL * weights_BxL).sum(), weights_BxL.sum()


def flops_per_token(model: GPT, n_params: int, lm_head: bool = True, length: int | None = None,
                    reference: bool = False) -> float:
  """Training FLOPs per token of rows `length` tokens long (default: the context length):
  6N + 12 * n_layer * d_model * length.

  The PaLM paper's convention (appendix B), as nanoGPT uses it: 6N for the forward and
  backward matmuls with the parameters (N without a learned position table, which is looked
  up), plus attention over the row's own length: a finetuning batch padded to 100 tokens
  attends over 100 positions, not the context. Without an LM head (a classifier) the token
  embedding is only looked up and an untied LM head unused: N leaves them out. `reference`
  (DPO) adds a frozen model's forward pass over the same tokens, a third of a trained pass:
  2N + 4 * n_layer * d_model * length.
  """
  cfg = model.config
  length = cfg.context_length if length is None else length
  n = n_params
  if getattr(cfg, "position", "learned") == "learned":
    n -= cfg.context_length * cfg.d_model
  if not lm_head:
    n -= cfg.vocab_size * cfg.d_model * (1 if getattr(cfg, "tie_embeddings", True) else 2)
  attention = 4 * cfg.n_layer * cfg.d_model * length  # one forward pass; backward is twice it
  trained = 6 * n + 3 * attention
  return trained + (2 * n + attention if reference else 0)
