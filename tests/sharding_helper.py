"""Sharded train steps on 8 simulated CPU devices; prints what tests/test_sharding.py checks.

Run as a subprocess (the device count is fixed when jax starts):

    python tests/sharding_helper.py [PART ...]  ->  one JSON object on the last line of stdout

PART is `gpt` (the GPT's meshes, scanned stacks and bf16 matmuls) or `others` (Llama's
components, the encoder, the errors), all of them by default; the test runs the two parts as
two processes at once, so their compilations share the cores.
"""

import os

# Compiling is most of the helper's time (16 train steps, each run 20 times): without LLVM's
# optimisations it takes half as long. The HLO passes (SPMD partitioning, fusion, buffer
# assignment) are the default level's, and so are what the tests read: the same layouts and
# temp bytes, mesh differences as small (measured: float32 <= 1.2e-6, bf16 <= 1.6e-4).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8"
                           + " --xla_backend_optimization_level=0")

import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from jaxllm import config as config_lib  # noqa: E402
from jaxllm.data.batches import RandomBatches  # noqa: E402
from jaxllm.errors import JaxllmError  # noqa: E402
from jaxllm.models import bert as encoder_lib  # noqa: E402
from jaxllm.models.bert import Encoder  # noqa: E402
from jaxllm.models.gpt import GPT, init_params  # noqa: E402
from jaxllm.tasks import mlm  # noqa: E402
from jaxllm.training import sharding  # noqa: E402
from jaxllm.training import step as train_lib  # noqa: E402

CONFIG = config_lib.ModelConfig(vocab_size=64, context_length=16, n_layer=2, n_head=4,
                                d_model=32)
MESHES = [(1, 1, 1), (8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]
# Where a family adds parameters of its own, not a way to split the batch: the meshes with a
# tensor axis (of 2 and of 4), each with fsdp 2. Pure data and pure FSDP splits are the GPT's.
SPLITTING_MESHES = [(1, 1, 1), (2, 2, 2), (1, 2, 4)]
STEPS = 20
RULES = sharding.logical_rules()


def mesh_of(shape):
  sizes = ml_collections.ConfigDict(dict(zip(sharding.MESH_AXES, shape)))
  return sharding.make_mesh(sizes, jax.devices()[:math.prod(shape)])


def optimizer():
  train = config_lib.default_config().train
  train.learning_rate, train.warmup_steps, train.schedule = 3e-3, 0, "constant"
  return train_lib.make_optimizer(train, STEPS)


def batches():
  # A learnable stream (a random 200-token phrase repeated): the loss falls well within 20 steps.
  tokens = np.tile(np.random.default_rng(0).integers(0, CONFIG.vocab_size, 200), 30)
  # 2 microbatches of 8 rows: every mesh splits rows 8, 4, 2 or 1 ways.
  return RandomBatches(tokens, 16, CONFIG.context_length, seed=0, microbatches=2)


# Llama's components: 2 kv heads for 4 query heads, split over a tensor axis of 2; on one of 4
# they are replicated (the rule the error for that case names).
LLAMA = dataclasses.replace(CONFIG, n_kv_head=2, norm="rmsnorm", position="rope", mlp="swiglu",
                            mlp_hidden=96, bias=False, qkv_bias=True, tie_embeddings=False)
REPLICATED_KV = sharding.logical_rules([("kv_heads", None)])


# A BERT-style encoder of the same size, on masked-LM batches of the same stream (ids below 63;
# 63 is [MASK]).
BERT = config_lib.EncoderConfig(vocab_size=64, context_length=16, n_layer=2, n_head=4,
                                d_model=32)


# Compiled once, for all the encoder's runs.
corrupt = jax.jit(functools.partial(mlm.mask_tokens, mask_id=63, vocab_size=63))


def mlm_batches():
  data = batches()

  def batch(step):
    windows = data.batch(step)["inputs"] % 63
    inputs, selected = corrupt(mlm.step_key(0, step), windows, np.ones(windows.shape, bool))
    return {"inputs": np.asarray(inputs), "targets": windows,
            "selected": np.asarray(selected, np.float32)}
  return batch


def initial_params(module, init_fn=init_params):
  """`init_fn(module, key 0)` as one compiled program (at this backend level, quicker than
  Linen's initialisation op by op)."""
  return jax.jit(functools.partial(init_fn, module))(jax.random.key(0))


def train_losses(model, shape, start_params, opt, rules=RULES, task="lm"):
  """Losses of STEPS steps (of `task`: lm or mlm) from `start_params` on the mesh `shape`, the
  final state, and the temp bytes per device XLA assigned to the step."""
  mesh = mesh_of(shape)
  axes = sharding.model_axes(model)
  sharding.check_divisible(*axes, mesh, rules)
  shardings = sharding.state_shardings(*axes, opt, mesh, rules)
  # From host copies: the step donates the state, which must not take `start_params` with it.
  state = jax.device_put(train_lib.create_train_state(jax.device_get(start_params), opt, seed=1),
                         shardings)
  if task == "mlm":
    kind = dict(loss_fn=functools.partial(mlm.masked_lm_loss, model=model),
                weight_fn=mlm.selected_count)
    next_batch = mlm_batches()
  else:
    kind = dict(loss_fn=functools.partial(train_lib.lm_loss, model=model))
    next_batch = batches().batch
  step = sharding.jit_train_step(
      functools.partial(train_lib.train_step, optimizer=opt, **kind), shardings, mesh, rules)
  losses = []
  for i in range(STEPS):
    batch = jax.device_put(next_batch(i), sharding.batch_sharding(mesh, rules, leading_axes=1))
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  compiled = step.lower(state, batch).compile()  # the executable the steps ran, from the cache
  return losses, state, int(compiled.memory_analysis().temp_size_in_bytes)


def layout(tree):
  """Per parameter: mesh axes per dimension, shard shape, whole and per-device bytes."""
  out = {}
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    name = "/".join(str(k.key) for k in path)
    out[name] = {"spec": [list(sharding._axes(a)) for a in x.sharding.spec],
                 "shard_shape": list(x.addressable_shards[0].data.shape),
                 "bytes": int(x.nbytes), "device_bytes": int(x.addressable_shards[0].data.nbytes)}
  return out


def error_of(fn):
  try:
    fn()
  except JaxllmError as e:
    return str(e)
  return None


def main(parts=("gpt", "others")):
  opt = optimizer()
  result = {"losses": {}, "layout": {}, "temp_bytes": {}}
  for part in parts:
    {"gpt": gpt_runs, "others": other_runs}[part](result, opt)
  print(json.dumps(result))


def gpt_runs(result, opt):
  model = GPT(CONFIG)
  params = initial_params(model)
  for shape in MESHES:
    losses, state, _ = train_losses(model, shape, params, opt)
    result["losses"][str(shape)] = losses
    if shape in ((1, 8, 1), (1, 2, 4)):
      result["layout"][str(shape)] = {"params": layout(state.params),
                                      "mu": layout(state.opt_state[1][0].mu)}

  # The same start as blocks_{i}, stacked for the scanned model; with and without remat.
  # (Under scan: XLA:CPU hoists an unrolled stack's recomputation, so only a scan saves memory.)
  stacked = {k: v for k, v in params.items() if not k.startswith("blocks_")}
  stacked["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs),
                                   *[params[f"blocks_{i}"] for i in range(CONFIG.n_layer)])
  for remat in ("none", "full"):
    scanned = GPT(dataclasses.replace(CONFIG, scan_layers=True, remat=remat))
    name = f"scan remat={remat} (2, 2, 2)"
    result["losses"][name], state, result["temp_bytes"][remat] = train_losses(
        scanned, (2, 2, 2), stacked, opt)
  result["layout"]["scan (2, 2, 2)"] = {"params": layout(state.params)}

  # bf16-operand matmuls (model.matmul_dtype): their 2-D reshapes shard like the einsums.
  bf16 = GPT(dataclasses.replace(CONFIG, matmul_dtype="bfloat16"))
  for shape in SPLITTING_MESHES:
    result["losses"][f"bf16 {shape}"], _, _ = train_losses(bf16, shape, params, opt)


def other_runs(result, opt):
  llama = GPT(LLAMA)
  llama_params = initial_params(llama)
  for shape in SPLITTING_MESHES:
    rules = REPLICATED_KV if shape == (1, 2, 4) else RULES
    result["losses"][f"llama {shape}"], state, _ = train_losses(llama, shape, llama_params, opt,
                                                                rules)
    if shape in ((2, 2, 2), (1, 2, 4)):
      result["layout"][f"llama {shape}"] = {"params": layout(state.params)}

  encoder = Encoder(BERT)
  encoder_params = initial_params(encoder, encoder_lib.init_params)
  for shape in SPLITTING_MESHES:
    result["losses"][f"bert {shape}"], state, _ = train_losses(
        encoder, shape, encoder_params, opt, task="mlm")
    if shape == (2, 2, 2):
      result["layout"]["bert (2, 2, 2)"] = {"params": layout(state.params)}

  mesh = mesh_of((2, 2, 2))
  result["errors"] = {
      "kv_heads": error_of(lambda: sharding.check_divisible(*sharding.model_axes(llama),
                                                            mesh_of((1, 1, 4)), RULES)),
      "mesh": error_of(lambda: sharding.make_mesh(
          ml_collections.ConfigDict({"data": 3, "fsdp": 1, "tensor": 1}))),
      "batch": error_of(lambda: sharding.check_batch(6, 1, mesh, RULES)),
      "vocab": error_of(lambda: sharding.check_divisible(*sharding.model_axes(
          GPT(dataclasses.replace(CONFIG, vocab_size=65))), mesh, RULES)),
      "heads": error_of(lambda: sharding.check_divisible(*sharding.model_axes(
          GPT(dataclasses.replace(CONFIG, n_head=2, d_model=32))), mesh_of((1, 1, 4)), RULES)),
  }


if __name__ == "__main__":
  main(sys.argv[1:] or ("gpt", "others"))
