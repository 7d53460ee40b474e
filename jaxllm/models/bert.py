"""A BERT-style bidirectional encoder in Flax Linen: the other branch of the transformer family,
beside jaxllm/models/gpt.py's decoders.

BERT (Devlin et al. 2019) as Hugging Face's `BertModel` computes it: token + learned position +
token-type (segment) embeddings, a LayerNorm, then blocks of full (not causal) self-attention
over the real tokens (padding is masked out as keys) and an exact-erf GELU MLP, each sublayer
followed by its residual sum and a LayerNorm (post-LN; `pre_norm` puts the LayerNorms first,
with a final one, as GPT-2 does). Two heads ride on the hidden states:

- the masked-LM head: Dense + GELU + LayerNorm, then the transposed token embedding plus a
  bias per vocabulary entry (BertForMaskedLM's `cls.predictions`);
- the pooler: tanh(Dense(the first token's state)), the [CLS] summary that
  BertForSequenceClassification's classifier reads.

Parameters name their logical axes as the decoder's do ("vocab", "embed", "heads", "kv",
"mlp"), so jaxllm/training/sharding.py's rules split them on any mesh.

Shapes are in the names: B batch, L sequence, D d_model, H heads, K head dim, F MLP hidden,
V vocabulary.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.config import EncoderConfig

# The decoder's initialisers (normal, zeros, ones with logical axes): BERT's std is GPT-2's.
from jaxllm.models.gpt import param_dtype
from jaxllm.models.layers import _init, _ones, _zeros, attention

STD = 0.02


def _layer_norm(cfg: EncoderConfig, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=cfg.layer_norm_epsilon, dtype=cfg.dtype, name=name,
                      scale_init=_ones(("embed",)), bias_init=_zeros(("embed",)))


def _dense(cfg: EncoderConfig, features: int, axes, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=cfg.dtype, kernel_init=_init(STD, axes),
                  bias_init=_zeros(axes[-1:]), name=name)


class SelfAttention(nn.Module):
  config: EncoderConfig

  @nn.compact
  def __call__(self, x_BxLxD, mask_BxL, deterministic: bool):
    cfg = self.config
    d, h, k = cfg.d_model, cfg.n_head, cfg.head_dim
    qkv_BxLx3xHxK = nn.Einsum(
        (d, 3, h, k), "bld,dthk->blthk", dtype=cfg.dtype, name="qkv",
        kernel_init=_init(STD, ("embed", None, "heads", "kv")),
        bias_init=_zeros((None, "heads", "kv")))(x_BxLxD)
    q_BxLxHxK, k_BxLxHxK, v_BxLxHxK = (qkv_BxLx3xHxK[:, :, i] for i in range(3))
    # Every query attends to every real key; padded keys are masked out.
    if cfg.dropout > 0 and not deterministic:
      scores_BxHxLxL = jnp.einsum("bqhk,bshk->bhqs", q_BxLxHxK, k_BxLxHxK) / math.sqrt(k)
      scores_BxHxLxL = jnp.where(mask_BxL[:, None, None, :], scores_BxHxLxL,
                                 jnp.finfo(scores_BxHxLxL.dtype).min)
      probs_BxHxLxL = nn.Dropout(cfg.dropout)(jax.nn.softmax(scores_BxHxLxL, axis=-1),
                                              deterministic=False)
      out_BxLxHxK = jnp.einsum("bhqs,bshk->bqhk", probs_BxHxLxL, v_BxLxHxK)
    else:
      out_BxLxHxK = attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, mask=mask_BxL[:, None, None, :])
    return nn.Einsum((h, k, d), "blhk,hkd->bld", dtype=cfg.dtype, name="out",
                     kernel_init=_init(STD, ("heads", "kv", "embed")),
                     bias_init=_zeros(("embed",)))(out_BxLxHxK)


class Block(nn.Module):
  config: EncoderConfig

  @nn.compact
  def __call__(self, x_BxLxD, mask_BxL, deterministic: bool):
    cfg = self.config
    drop = nn.Dropout(cfg.dropout, deterministic=deterministic)
    attention = SelfAttention(cfg, name="attn")
    fc = _dense(cfg, cfg.hidden, ("embed", "mlp"), "fc")
    proj = _dense(cfg, cfg.d_model, ("mlp", "embed"), "proj")

    def mlp(y_BxLxD):
      return proj(nn.gelu(fc(y_BxLxD), approximate=False))  # BERT's exact (erf) GELU

    ln_1, ln_2 = _layer_norm(cfg, "ln_1"), _layer_norm(cfg, "ln_2")
    if cfg.pre_norm:
      x_BxLxD = x_BxLxD + drop(attention(ln_1(x_BxLxD), mask_BxL, deterministic))
      x_BxLxD = x_BxLxD + drop(mlp(ln_2(x_BxLxD)))
    else:
      x_BxLxD = ln_1(x_BxLxD + drop(attention(x_BxLxD, mask_BxL, deterministic)))
      x_BxLxD = ln_2(x_BxLxD + drop(mlp(x_BxLxD)))
    return nn.with_logical_constraint(x_BxLxD, ("batch", "sequence", "embed"))


class Encoder(nn.Module):
  """`encode` gives the hidden states, `mlm_logits` and `pool` the two heads; `__call__` runs
  all three (what `init` uses to make every parameter)."""

  config: EncoderConfig

  def setup(self):
    cfg = self.config
    self.wte = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype,
                        embedding_init=_init(STD, ("vocab", "embed")))
    self.wpe = nn.Embed(cfg.context_length, cfg.d_model, dtype=cfg.dtype,
                        embedding_init=_init(STD, (None, "embed")))
    self.wtt = nn.Embed(cfg.type_vocab_size, cfg.d_model, dtype=cfg.dtype,
                        embedding_init=_init(STD, (None, "embed")))
    self.ln_embed = _layer_norm(cfg, "ln_embed")
    self.drop = nn.Dropout(cfg.dropout)
    self.blocks = [Block(cfg, name=f"blocks_{i}") for i in range(cfg.n_layer)]
    self.ln_f = _layer_norm(cfg, "ln_f") if cfg.pre_norm else None
    self.mlm_transform = _dense(cfg, cfg.d_model, ("embed", None), "mlm_transform")
    self.mlm_ln = _layer_norm(cfg, "mlm_ln")
    self.mlm_bias = self.param("mlm_bias", _zeros(("vocab",)), (cfg.vocab_size,))
    self.pooler = _dense(cfg, cfg.d_model, ("embed", None), "pooler")

  def encode(self, tokens_BxL, mask_BxL=None, token_types_BxL=None,
             deterministic: bool = True):
    """Hidden states BxLxD. `mask_BxL` marks the real tokens (default: ids != pad_id);
    `token_types_BxL` the segment of each (default: all 0)."""
    length = tokens_BxL.shape[1]
    if length > self.config.context_length:
      raise ValueError(f"sequence length {length} exceeds max_position_embeddings "
                       f"{self.config.context_length}")
    if mask_BxL is None:
      mask_BxL = tokens_BxL != self.config.pad_id
    if token_types_BxL is None:
      token_types_BxL = jnp.zeros_like(tokens_BxL)
    # Rows looked up in tables whose d_model side is whole, as GPT.encode does: a lookup into
    # an FSDP-split table makes XLA replicate the result to split it by batch rows instead.
    dtype = self.config.dtype

    def lookup(table, ids, axes):
      return jnp.take(nn.with_logical_constraint(table.embedding.astype(dtype), axes), ids,
                      axis=0)

    x_BxLxD = (lookup(self.wte, tokens_BxL, ("vocab", None))
               + lookup(self.wpe, jnp.arange(length), (None, None))[None]
               + lookup(self.wtt, token_types_BxL, (None, None)))
    x_BxLxD = self.drop(self.ln_embed(x_BxLxD), deterministic=deterministic)
    x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("batch", "sequence", "embed"))
    for block in self.blocks:
      x_BxLxD = block(x_BxLxD, mask_BxL.astype(bool), deterministic)
    return self.ln_f(x_BxLxD) if self.ln_f is not None else x_BxLxD

  def mlm_logits(self, hidden_BxLxD):
    """float32 masked-LM logits BxLxV: transform, then the tied token embedding + bias."""
    h_BxLxD = self.mlm_ln(nn.gelu(self.mlm_transform(hidden_BxLxD), approximate=False))
    logits_BxLxV = self.wte.attend(h_BxLxD) + self.mlm_bias
    return nn.with_logical_constraint(
        logits_BxLxV.astype(jnp.promote_types(self.config.dtype, jnp.float32)),
        ("batch", "sequence", "vocab"))

  def pool(self, hidden_BxLxD):
    """tanh(Dense(first token's state)), BxD: BERT's [CLS] summary."""
    return jnp.tanh(self.pooler(hidden_BxLxD[:, 0]))

  def __call__(self, tokens_BxL, mask_BxL=None, token_types_BxL=None,
               deterministic: bool = True):
    hidden_BxLxD = self.encode(tokens_BxL, mask_BxL, token_types_BxL, deterministic)
    return self.mlm_logits(hidden_BxLxD), self.pool(hidden_BxLxD)


def mask_id(tokenizer) -> int:
  """[MASK]'s id: the tokenizer's own (WordPiece), else one id past its vocabulary."""
  return getattr(tokenizer, "mask_id", tokenizer.vocab_size)


def vocab_size(tokenizer) -> int:
  """An encoder's vocabulary over `tokenizer`: its ids, plus [MASK] where it has none."""
  return max(tokenizer.vocab_size, mask_id(tokenizer) + 1)


def special_ids(tokenizer) -> tuple[int, ...]:
  """Ids masked-LM never selects: WordPiece's [PAD], [CLS], [SEP] and [MASK]; the end-of-text
  id of other tokenizers."""
  if hasattr(tokenizer, "cls_id"):
    return (tokenizer.pad_id, tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id)
  return (tokenizer.eot_id,)


def init_params(model: Encoder, rng: jax.Array):
  """Fresh parameters (all of them, both heads included) as a plain pytree of float32 (float64
  under model.dtype=float64)."""
  dummy = jnp.ones((1, 1), jnp.int32)
  return param_dtype(model.config, nn.unbox(model.init(rng, dummy)["params"]))


def mean_pool(hidden_BxLxD: jax.Array, mask_BxL: jax.Array) -> jax.Array:
  """The mean of each row's hidden states over its real tokens, BxD (the other pooling)."""
  weights_BxL = mask_BxL.astype(hidden_BxLxD.dtype)
  total_BxD = jnp.einsum("bld,bl->bd", hidden_BxLxD, weights_BxL)
  return total_BxD / jnp.maximum(weights_BxL.sum(axis=1, keepdims=True), 1.0)
