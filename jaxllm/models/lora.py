"""LoRA (Hu et al., 2021) as a pure transformation of a parameter pytree.

A target kernel W, seen as an IxO matrix, becomes W + (alpha / rank) * A @ B with A: Ixr and
B: rxO. Adapters are a pytree mirroring the params down to each target's module,
`{"backbone": {"blocks_0": {"attn": {"qkv": {"lora_a": GxIxR, "lora_b": GxRxO}}}}, ...}`, so
an optax mask can train them alone. `merge` folds them into plain weights (training uses it
inside the jitted loss; export and generation use its result); `intercept` applies them on
the fly, x @ W + scale * (x @ A) @ B, without ever forming W + AB.

jaxllm's kernels as matrices: qkv (D,3,H,K) is three DxHK matrices, q, k and v, each with its
own adapter (G=3, as the book's separate W_query/W_key/W_value get); attention out (H,K,D) is
HKxD; MLP fc (D,F) and proj (F,D), the classification head (D,C) and an untied lm_head (D,V)
are matrices already (G=1). Llama's components: q (D,H,K) is one DxHK matrix, kv (D,2,G,K)
two DxGK matrices (k and v), the SwiGLU MLP's gate and up (D,F) matrices. A is drawn as the book draws it (PyTorch's kaiming_uniform_ with
a=sqrt(5) on a (I, r) tensor: uniform in +-1/sqrt(r)); B starts at zero, so a fresh adapter
changes nothing.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxllm.errors import JaxllmError

# Target name (the module holding the kernel) -> (input axes, kernel ndim). Leading axes
# beyond that ndim (the "layers" axis of model.scan_layers) get one adapter per entry.
TARGETS = {"qkv": (1, 4), "out": (2, 3), "fc": (1, 2), "proj": (1, 2), "head": (1, 2),
           "lm_head": (1, 2),
           # Llama's components: q (D, H, K) and kv (D, 2, G, K) of grouped-query attention,
           # the SwiGLU MLP's gate and up.
           "q": (1, 3), "kv": (1, 4), "gate": (1, 2), "up": (1, 2)}
# Kernels whose axis 1 stacks separate projections (q, k, v; or k, v): one adapter each.
GROUPED = ("qkv", "kv")


def parse_targets(spec: str | Sequence[str]) -> tuple[str, ...]:
  names = tuple(t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec)
                if t.strip())
  unknown = [t for t in names if t not in TARGETS]
  if unknown or not names:
    raise JaxllmError(f"lora.targets: unknown or empty target(s) {unknown or names} "
                      f"(a comma-separated list of: {', '.join(TARGETS)})")
  return names


def scale(alpha: float, rank: int) -> float:
  return float(alpha) / int(rank)


def _matrix_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """(*leading, G, I, O): the kernel as G matrices of IxO."""
  n_in, ndim = TARGETS[name]
  lead, shape = shape[:len(shape) - ndim], shape[len(shape) - ndim:]
  if name in GROUPED:  # (D, 3, H, K) or (D, 2, G, K)
    return (*lead, shape[1], shape[0], shape[2] * shape[3])
  return (*lead, 1, math.prod(shape[:n_in]), math.prod(shape[n_in:]))


def _targets_in(params: Any, names: Sequence[str], prefix: tuple[str, ...] = ()
                ) -> Iterator[tuple[tuple[str, ...], tuple[int, ...]]]:
  """(module path, kernel shape) of every kernel whose module is a target, in tree order."""
  for key in sorted(params):
    value = params[key]
    if isinstance(value, dict):
      yield from _targets_in(value, names, prefix + (key,))
    elif key == "kernel" and prefix and prefix[-1] in names:
      yield prefix, tuple(value.shape)


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree: Any, path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def init(rng: jax.Array, params: Any, targets: Sequence[str], rank: int) -> dict:
  """Fresh adapters for every target kernel in `params` (B = 0: merging changes nothing)."""
  if rank <= 0:
    raise JaxllmError(f"lora.rank must be a positive integer, got {rank}")
  found = list(_targets_in(params, targets))
  if not found:
    raise JaxllmError(f"lora.targets {','.join(targets)} match no kernel of the model")
  adapters: dict = {}
  bound = 1.0 / math.sqrt(rank)
  for i, (path, shape) in enumerate(found):
    *lead, groups, n_in, n_out = _matrix_shape(path[-1], shape)
    a_GxIxR = jax.random.uniform(jax.random.fold_in(rng, i), (*lead, groups, n_in, rank),
                                 jnp.float32, -bound, bound)
    _set(adapters, path, {"lora_a": a_GxIxR,
                          "lora_b": jnp.zeros((*lead, groups, rank, n_out), jnp.float32)})
  return adapters


def _adapters_in(adapters: Any, prefix: tuple[str, ...] = ()
                 ) -> Iterator[tuple[tuple[str, ...], dict]]:
  if "lora_a" in adapters:
    yield prefix, adapters
    return
  for key in sorted(adapters):
    yield from _adapters_in(adapters[key], prefix + (key,))


def delta(name: str, shape: tuple[int, ...], adapter: dict, scale_: float) -> jax.Array:
  """scale * A @ B laid out as the kernel: the change merging makes to it."""
  delta_GxIxO = scale_ * jnp.einsum("...gir,...gro->...gio", adapter["lora_a"],
                                    adapter["lora_b"])
  if name in GROUPED:  # (..., 3, D, HK) -> (..., D, 3, H, K)
    return jnp.swapaxes(delta_GxIxO, -3, -2).reshape(shape)
  return delta_GxIxO.reshape(shape)


def merge(params: Any, adapters: Any, scale_: float) -> Any:
  """`params` with every adapted kernel replaced by W + scale * A @ B; the rest shared."""
  merged = jax.tree.map(lambda x: x, params)  # new containers, same leaves
  for path, adapter in _adapters_in(adapters):
    kernel = _get(params, path + ("kernel",))
    _set(merged, path + ("kernel",),
         kernel + delta(path[-1], kernel.shape, adapter, scale_).astype(kernel.dtype))
  return merged


def apply_linear(x: jax.Array, adapter: dict, name: str, scale_: float) -> jax.Array:
  """The adapter's own contribution to a target layer's output: scale * (x @ A) @ B."""
  groups, n_in, _ = adapter["lora_a"].shape
  x_NxI = x.reshape(x.shape[:x.ndim - TARGETS[name][0]] + (n_in,))
  low_NxGxR = jnp.einsum("...i,gir->...gr", x_NxI, adapter["lora_a"].astype(x.dtype))
  out_NxGxO = jnp.einsum("...gr,gro->...go", low_NxGxR, adapter["lora_b"].astype(x.dtype))
  out = scale_ * out_NxGxO
  return out if groups > 1 else out[..., 0, :]


@contextlib.contextmanager
def intercept(adapters: Any, scale_: float):
  """Within this context, a Flax model's Dense layers at adapted paths add scale*(x@A)@B.

  `adapters` mirrors the model's own params (pass `adapters["backbone"]` for the GPT). Not
  for model.scan_layers, whose blocks see one layer's slice at a time: merge there.
  """
  by_path = dict(_adapters_in(adapters))

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    # Any linear layer (Dense, DenseGeneral, Einsum) at an adapted path: its call's first
    # argument is the input the kernel multiplies.
    adapter = by_path.get(tuple(context.module.path))
    if context.method_name != "__call__" or adapter is None:
      return out
    return out + apply_linear(args[0], adapter, context.module.path[-1], scale_).reshape(out.shape)

  with nn.intercept_methods(interceptor):
    yield


def logical_axes(adapters: Any, param_axes: Any) -> dict:
  """Logical axes of the adapters, from their kernels' (`param_axes` mirrors the params).

  A's input side and B's output side are the kernel's flattened input and output dimensions;
  each takes the name of its outermost dimension (splitting it into contiguous blocks is
  splitting that dimension), so FSDP and tensor parallelism split the adapters as they split
  the kernels. Groups and the rank stay whole.
  """
  axes: dict = {}
  for path, _ in _adapters_in(adapters):
    spec = tuple(_get(param_axes, path + ("kernel",)))
    name = path[-1]
    n_in, ndim = TARGETS[name]
    lead, dims = spec[:len(spec) - ndim], spec[len(spec) - ndim:]
    inputs, outputs = (dims[:1], dims[2:]) if name in GROUPED else (dims[:n_in], dims[n_in:])
    _set(axes, path, {"lora_a": P(*lead, None, inputs[0], None),
                      "lora_b": P(*lead, None, None, outputs[0])})
  return axes
