"""Muon (Jordan et al. 2024, the GPT-2 speedrun's optimizer) for the transformer blocks' hidden
matrices; `step.make_optimizer` gives every other leaf AdamW.

Muon keeps a momentum of the gradient (Nesterov's form), replaces it by the nearest
semi-orthogonal matrix (five quintic Newton–Schulz iterations, `optax.contrib`'s, on the
Frobenius-normalised momentum: singular values pushed into roughly 0.7–1.2, not exactly 1),
scales it by sqrt(max(1, fan_out / fan_in)) and steps by the learning rate. Its pieces are
`optax.contrib.scale_by_muon` and the same width scaling, chained as `optax.contrib.muon`
chains them (tests/test_muon.py checks the two updates agree); `optax.contrib.muon`'s own Adam half is not used, since it
is Nesterov AdamW with one learning rate, weight decay on every leaf it holds (biases and
norm scales too), where jaxllm's other leaves keep the `adamw` optimizer's exact update.

Which leaves are matrices, and how (module name -> the kernel's reduction and output axes,
counted from the end so that scan_layers' leading "layers" axis, and every other axis left
out, is a batch axis: one matrix per entry):

- qkv (D, 3, H, K): three D x HK matrices, q, k and v apart (the stacked axis a batch axis),
  each whole over its heads (the speedrun's q, k, v weights); Llama's q (D, H, K) one D x HK
  matrix, kv (D, 2, G, K) two D x GK matrices (k and v);
- out (H, K, D): one HK x D matrix (all heads together);
- fc, gate, up (D, F) and proj (F, D): the MLP's matrices as they are.

Embeddings, an untied lm_head, a classification head, BERT's pooler and MLM transform, norm
scales, biases and LoRA adapters go to AdamW (the speedrun keeps its embeddings, head and
scalars on Adam).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import ml_collections
import optax
from optax import contrib

# Module name -> (the kernel's ndim without stacking, reduction axes, output axes).
MATRICES: dict[str, tuple[int, tuple[int, ...], tuple[int, ...]]] = {
    "qkv": (4, (-4,), (-2, -1)), "q": (3, (-3,), (-2, -1)), "kv": (4, (-4,), (-2, -1)),
    "out": (3, (-3, -2), (-1,)),
    "fc": (2, (-2,), (-1,)), "gate": (2, (-2,), (-1,)), "up": (2, (-2,), (-1,)),
    "proj": (2, (-2,), (-1,)),
}


def leaf_dimension_numbers(path, leaf) -> contrib.MuonDimensionNumbers | None:
  """A parameter's Muon matrix layout, or None for one that AdamW updates."""
  keys = [str(getattr(entry, "key", entry)) for entry in path]
  if len(keys) < 2 or keys[-1] != "kernel" or keys[-2] not in MATRICES:
    return None
  ndim, reduction, output = MATRICES[keys[-2]]
  if leaf.ndim < ndim:  # not the layout this table describes
    return None
  return contrib.MuonDimensionNumbers(reduction_axis=reduction, output_axis=output)


def dimension_numbers(params: Any) -> Any:
  """A tree like `params`: MuonDimensionNumbers for Muon's matrices, None for AdamW's leaves."""
  return jax.tree_util.tree_map_with_path(leaf_dimension_numbers, params)


def labels(params: Any, trainable: Any = None) -> Any:
  """"muon", "adam" or (a False leaf of `trainable`) "freeze" per parameter."""
  def label(path, leaf, train=True):
    if not train:
      return "freeze"
    return "adam" if leaf_dimension_numbers(path, leaf) is None else "muon"

  if trainable is None:
    return jax.tree_util.tree_map_with_path(label, params)
  return jax.tree_util.tree_map_with_path(label, params, trainable)


def _masked_dimension_numbers(updates: Any) -> Any:
  # Inside optax.multi_transform the other partitions' leaves are MaskedNodes (no leaves), so
  # the tree of MuonDimensionNumbers follows the masked tree's structure.
  return jax.tree_util.tree_map_with_path(leaf_dimension_numbers, updates)


def momentum_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
  """muon_momentum_start -> muon_momentum linearly over muon_momentum_warmup_steps (the
  speedrun's 0.85 -> 0.95 over 300 steps), then constant."""
  warmup = int(train.muon_momentum_warmup_steps)
  if warmup == 0:
    return optax.constant_schedule(train.muon_momentum)
  return optax.linear_schedule(train.muon_momentum_start, train.muon_momentum, warmup)


def scale_by_muon(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """`optax.contrib.scale_by_muon` (Nesterov momentum, optax's default Newton–Schulz
  coefficients, train.muon_ns_steps iterations) with its momentum from `momentum_schedule`:
  the state is optax's MuonState, whose count gives the step."""
  beta = momentum_schedule(train)

  def transform(momentum) -> optax.GradientTransformation:
    return contrib.scale_by_muon(ns_steps=int(train.muon_ns_steps), beta=momentum,
                                 nesterov=True, weight_dimension_numbers=_masked_dimension_numbers)

  def update(updates, state, params=None):
    return transform(beta(state.count)).update(updates, state, params)

  return optax.GradientTransformation(transform(train.muon_momentum).init, update)


def scale_by_shape() -> optax.GradientTransformation:
  """Each matrix's update times sqrt(max(1, fan_out / fan_in)) (Jordan's width scaling, as
  optax.contrib.muon applies it; its transform is not public)."""
  def scale(update, dims):
    fan_in = math.prod(update.shape[axis] for axis in dims.reduction_axis)
    fan_out = math.prod(update.shape[axis] for axis in dims.output_axis)
    return update * math.sqrt(max(1.0, fan_out / fan_in))

  def update(updates, state, params=None):
    del params
    return jax.tree.map(scale, updates, _masked_dimension_numbers(updates),
                        is_leaf=lambda x: isinstance(x, contrib.MuonDimensionNumbers)), state

  return optax.GradientTransformation(optax.init_empty_state, update)


def muon(train: ml_collections.ConfigDict, schedule: Callable) -> optax.GradientTransformation:
  """The Muon leaves' update: orthogonalised momentum, shape scaling, decoupled weight decay
  (train.muon_weight_decay, multiplied by Muon's learning rate as optax's muon does), then
  -schedule(step)."""
  parts = [scale_by_muon(train),
           scale_by_shape()]
  if train.muon_weight_decay:
    parts.append(optax.add_decayed_weights(train.muon_weight_decay))
  parts.append(optax.scale_by_learning_rate(schedule))
  return optax.chain(*parts)
