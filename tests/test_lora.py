"""LoRA: adapters alone train, merging equals applying them on the fly, the book's count."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import config as config_lib
from jaxllm.errors import JaxllmError
from jaxllm.models import heads, lora
from jaxllm.models.gpt import GPT, abstract_variables, init_params
from jaxllm.tasks import common, losses
from jaxllm.training import step as train_lib

TINY = config_lib.ModelConfig(vocab_size=48, context_length=16, n_layer=2, n_head=2, d_model=32)
TARGETS = ("qkv", "out", "fc", "proj", "head")
# Llama's components: grouped-query q / kv kernels and a SwiGLU MLP.
TINY_LLAMA = config_lib.ModelConfig(vocab_size=48, context_length=16, n_layer=2, n_head=2,
                                    d_model=32, n_kv_head=1, norm="rmsnorm", position="rope",
                                    mlp="swiglu", mlp_hidden=48, bias=False)
LLAMA_TARGETS = ("q", "kv", "out", "gate", "up", "proj", "head")


def _params(model, num_classes=2):
  return {"backbone": init_params(model, jax.random.key(0)),
          "head": heads.classifier_init(jax.random.key(1), model.config.d_model, num_classes)}


def _randomise(adapters, seed):
  """Non-zero B everywhere (fresh adapters have B = 0 and change nothing)."""
  leaves, tree = jax.tree.flatten(adapters)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape)
                                   for x, k in zip(leaves, keys)])


def test_adapter_count_matches_the_book_for_gpt2_small():
  model = GPT(config_lib.ModelConfig(vocab_size=50257, context_length=1024, n_layer=12,
                                     n_head=12, d_model=768))
  abstract = {"backbone": nn.unbox(abstract_variables(model)["params"]),
              "head": jax.eval_shape(lambda: heads.classifier_init(jax.random.key(0), 768, 2))}
  adapters = jax.eval_shape(lambda: lora.init(jax.random.key(0), abstract, TARGETS, 16))
  # Appendix E: "Total trainable LoRA parameters: 2,666,528" (q, k, v, out, fc, proj x 12
  # blocks, and the class head).
  assert sum(x.size for x in jax.tree.leaves(adapters)) == 2_666_528
  qkv = adapters["backbone"]["blocks_0"]["attn"]["qkv"]
  assert qkv["lora_a"].shape == (3, 768, 16) and qkv["lora_b"].shape == (3, 16, 768)


@pytest.mark.parametrize("config, targets", [(TINY, TARGETS), (TINY_LLAMA, LLAMA_TARGETS)],
                         ids=["gpt2", "llama"])
def test_merged_weights_give_the_logits_of_adapters_on_the_fly(config, targets):
  model = GPT(config)
  params = _params(model)
  adapters = _randomise(lora.init(jax.random.key(2), params, targets, 4), seed=3)
  if config is TINY_LLAMA:  # k and v get an adapter each, like q, k, v in the fused kernel
    kv = adapters["backbone"]["blocks_0"]["attn"]["kv"]
    assert kv["lora_a"].shape == (2, 32, 4) and kv["lora_b"].shape == (2, 4, 16)
    assert {"q", "kv", "out"} == adapters["backbone"]["blocks_1"]["attn"].keys()
  scale = lora.scale(8.0, 4)
  tokens_BxL = jnp.asarray(np.random.default_rng(0).integers(0, 48, size=(3, 12)), jnp.int32)
  length_B = jnp.array([12, 7, 3])

  @jax.jit
  def merged_logits(params, adapters):
    merged = lora.merge(params, adapters, scale)
    hidden_BxLxD, _ = model.apply({"params": merged["backbone"]}, tokens_BxL, method=model.encode)
    return heads.classifier_apply(merged["head"], heads.last_token(hidden_BxLxD, length_B))

  @jax.jit
  def on_the_fly_logits(params, adapters):
    with lora.intercept(adapters["backbone"], scale):  # x @ W + scale * (x @ A) @ B
      hidden_BxLxD, _ = model.apply({"params": params["backbone"]}, tokens_BxL,
                                    method=model.encode)
    last_BxD = heads.last_token(hidden_BxLxD, length_B)
    return (heads.classifier_apply(params["head"], last_BxD)
            + lora.apply_linear(last_BxD, adapters["head"], "head", scale))

  merged_BxC = merged_logits(params, adapters)
  on_the_fly_BxC = on_the_fly_logits(params, adapters)

  plain_BxC = jax.jit(functools.partial(losses.classifier_logits, backbone=model))(
      params, {"tokens_BxL": tokens_BxL, "length_B": length_B})
  assert np.abs(np.asarray(merged_BxC - plain_BxC)).max() > 1e-2  # the adapters do something
  np.testing.assert_allclose(merged_BxC, on_the_fly_BxC, atol=1e-5)
  # Fresh adapters (B = 0) change nothing.
  fresh = lora.merge(params, lora.init(jax.random.key(2), params, targets, 4), scale)
  for a, b in zip(jax.tree.leaves(fresh), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


def test_only_adapters_train():
  model = GPT(TINY)
  params = _params(model)
  params["lora"] = lora.init(jax.random.key(2), params, TARGETS, 4)
  mask = common.trainable_mask(params, "lora", TINY.n_layer)
  d, f, r = 32, 128, 4  # q, k, v, out: DxD each; fc DxF; proj FxD; head Dx2
  per_block = 4 * (d * r + r * d) + (d * r + r * f) + (f * r + r * d)
  expected = 2 * per_block + (d * r + r * 2)
  assert common.count_trainable(params, mask) == expected == 4_744

  train = config_lib.default_config().train
  train.learning_rate, train.warmup_steps, train.schedule = 1e-2, 0, "constant"
  optimizer = train_lib.make_optimizer(train, 10, mask)
  loss_fn = functools.partial(losses.classification_loss, backbone=model, lora_scale=2.0)
  step = jax.jit(functools.partial(train_lib.train_step, loss_fn=loss_fn, optimizer=optimizer,
                                   trainable=mask))
  rng = np.random.default_rng(1)
  batch = {"tokens_BxL": jnp.asarray(rng.integers(0, 48, size=(4, 10)), jnp.int32),
           "length_B": jnp.array([10, 6, 4, 9]), "label_B": jnp.array([0, 1, 1, 0])}
  batch = {k: v[None] for k, v in batch.items()}  # one microbatch
  state = train_lib.create_train_state(params, optimizer, seed=0)
  for _ in range(3):
    state, metrics = step(state, batch)
  for name in ("backbone", "head"):
    for a, b in zip(jax.tree.leaves(state.params[name]), jax.tree.leaves(params[name])):
      np.testing.assert_array_equal(a, b)
  changed = [not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(state.params["lora"]), jax.tree.leaves(params["lora"]))]
  assert all(changed)


def test_merge_handles_stacked_layers_and_rejects_bad_targets():
  # model.scan_layers stacks kernels under a leading layer axis: one adapter per layer.
  kernel_LxDxF = jax.random.normal(jax.random.key(0), (3, 8, 12))
  params = {"blocks": {"mlp": {"fc": {"kernel": kernel_LxDxF}}}}
  adapters = _randomise(lora.init(jax.random.key(1), params, ("fc",), 2), seed=2)
  adapter = adapters["blocks"]["mlp"]["fc"]
  assert adapter["lora_a"].shape == (3, 1, 8, 2) and adapter["lora_b"].shape == (3, 1, 2, 12)
  merged = lora.merge(params, adapters, 0.5)["blocks"]["mlp"]["fc"]["kernel"]
  for layer in range(3):
    expected = kernel_LxDxF[layer] + 0.5 * adapter["lora_a"][layer, 0] @ adapter["lora_b"][layer, 0]
    np.testing.assert_allclose(merged[layer], expected, atol=1e-6)
  with pytest.raises(JaxllmError, match="unknown or empty target"):
    lora.parse_targets("qkv,mlp")
  with pytest.raises(JaxllmError, match="match no kernel"):
    lora.init(jax.random.key(0), params, ("qkv",), 2)
