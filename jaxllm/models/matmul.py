"""Matmuls with bfloat16 operands and float32 products, in the forward and the backward pass
(`model.matmul_dtype = "bfloat16"`).

On CPUs with bf16 dot instructions (avx512_bf16, AMX) a bf16 x bf16 -> f32 matmul runs at
about twice the float32 rate, but a plain Linen `dtype=bfloat16` model does not get it: the
backward matmuls multiply a float32 cotangent by a bfloat16 operand, XLA promotes both to
float32, and the forward's bf16 casts only add work. Here the operands are rounded to bf16,
every product (y = a b; da = g b^T; db = a^T g) is accumulated and returned in float32, and
the cotangent is rounded to bf16 before the two backward products. Activations, residuals,
normalisations, softmax and the optimizer stay float32; the residuals saved for the backward
pass are the bf16 operands (half the memory of float32 ones).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

_BF16 = jnp.bfloat16


def _nn(a_NxK, b_KxM):
  return jnp.dot(a_NxK, b_KxM, preferred_element_type=jnp.float32)


def _nt(a_NxK, b_MxK):
  """a @ b.T, written as one dot_general over both operands' last dims: XLA:CPU runs that
  form at the bf16 rate, while `jnp.dot(a, b.T)` gets its bf16 operands widened back to
  float32 (measured at 1024x3072x768: 14 against 25 ms)."""
  return jax.lax.dot_general(a_NxK, b_MxK, (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32)


def _tn(a_NxK, b_NxM):
  """a.T @ b, the weight gradients: it contracts the rows (tokens), and XLA:CPU widens that
  form to float32 whatever the operands' layout (a materialised transpose, a barrier, a
  dot_general over dims 0: all 25-31 against 12 ms for 3072x1024x768 in canonical form)."""
  return _nn(a_NxK.T, b_NxM)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def bf16_matmul(a: jax.Array, b: jax.Array, transpose_b: bool = False) -> jax.Array:
  """a @ b (a @ b.T if transpose_b) with both rounded to bf16, accumulated in float32."""
  return (_nt if transpose_b else _nn)(a.astype(_BF16), b.astype(_BF16))


def _forward(a, b, transpose_b):
  a16, b16 = a.astype(_BF16), b.astype(_BF16)
  # Zero-size arrays carry the operands' dtypes to the backward pass (cotangents match them).
  dtypes = (jnp.zeros((0,), a.dtype), jnp.zeros((0,), b.dtype))
  return (_nt if transpose_b else _nn)(a16, b16), (a16, b16, dtypes)


def _backward(transpose_b, residuals, g):
  a16, b16, (a_dtype, b_dtype) = residuals
  g16 = g.astype(_BF16)
  if transpose_b:  # y = a b^T: da = g b, db = g^T a
    da, db = _nn(g16, b16), _tn(g16, a16)
  else:  # y = a b: da = g b^T, db = a^T g
    da, db = _nt(g16, b16), _tn(a16, g16)
  return da.astype(a_dtype.dtype), db.astype(b_dtype.dtype)


bf16_matmul.defvjp(_forward, _backward)


def contract(x: jax.Array, kernel: jax.Array, n_in: int) -> jax.Array:
  """x's last `n_in` dims contracted with kernel's first `n_in` (as nn.Dense and the model's
  einsums do), through bf16_matmul on the flattened matrices."""
  k = math.prod(kernel.shape[:n_in])
  out_shape = x.shape[:x.ndim - n_in] + kernel.shape[n_in:]
  return bf16_matmul(x.reshape(-1, k), kernel.reshape(k, -1)).reshape(out_shape)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """`lax.dot_general` for nn.Dense (x's last dim with the kernel's first), via bf16_matmul."""
  del precision, preferred_element_type
  (lhs_contract, rhs_contract), batch = dimension_numbers
  if tuple(rhs_contract) != (0,) or tuple(lhs_contract) != (lhs.ndim - 1,) or any(batch):
    raise NotImplementedError(f"bf16 dot_general for {dimension_numbers}")
  return contract(lhs, rhs, 1)


class Bf16Einsum(nn.Einsum):
  """nn.Einsum (same parameters: names, shapes, initialisers, logical axes) for contractions
  of the input's trailing dims with the kernel's leading dims, computed by bf16_matmul."""

  @nn.compact
  def __call__(self, inputs: jax.Array, einsum_str: str | None = None) -> jax.Array:
    del einsum_str
    lhs, rhs_out = self.einsum_str.replace(" ", "").split(",")
    rhs, out = rhs_out.split("->")
    n_in = sum(1 for axis in rhs if axis in lhs)
    if not (lhs.endswith(rhs[:n_in]) and out == lhs[:len(lhs) - n_in] + rhs[n_in:]):
      raise NotImplementedError(f"bf16 einsum '{self.einsum_str}'")
    kernel = self.param("kernel", self.kernel_init, self.shape, self.param_dtype)
    y = contract(inputs, kernel, n_in)
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, self.shape[n_in:], self.param_dtype)
    return y.astype(self.dtype or y.dtype)
