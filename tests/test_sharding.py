"""Sharded training: one train step on any (data, fsdp, tensor) mesh, and multi-host runs.

Multi-device checks run in subprocesses (the CPU device count is fixed when jax starts), all
started at once so they share the cores: tests/sharding_helper.py on 8 simulated devices (its
two parts as two processes), and `jaxllm train` as two processes joined on 127.0.0.1 and as
one process with 4 devices.
"""

import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import types

import jax
import ml_collections
import numpy as np
import pytest

from jaxllm import config as config_lib
from jaxllm.errors import JaxllmError
from jaxllm.models.gpt import GPT, init_params
from jaxllm.training import multihost, sharding
from jaxllm.training import step as train_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = config_lib.ModelConfig(vocab_size=64, context_length=16, n_layer=2, n_head=4, d_model=32)


def _env(devices: int, **extra: str) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAXLLM_")}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             PYTHONPATH=str(REPO), **extra)
  # The data mirror, and the session's compilation cache (tests/conftest.py), which keeps the
  # runs out of ~/.cache and gives them the programs test_launch.py's runs of this config
  # compiled (the number of steps is no part of a program).
  for name in ("JAXLLM_SHARED_DATA", "JAXLLM_COMPILATION_CACHE"):
    if name in os.environ:
      env[name] = os.environ[name]
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_data):
  """The helper's measurements (`.helper`), and the stdout and run directory of `jaxllm train`
  on 4 devices in one process (`.one`) and in two processes of 2 (`.two`, `.second`)."""
  tmp_path = tmp_path_factory.mktemp("sharding")
  corpus = tmp_path / "verdict.txt"
  corpus.write_text((shared_data / "the-verdict.txt").read_text())
  args = [sys.executable, "-m", "jaxllm.cli", "train", "--config",
          "experiments/shakespeare_char.py", "--config.data.dataset=text",
          f"--config.data.path={corpus}", "--config.data.train_split=train",
          # The Verdict has 62 distinct characters + <|endoftext|> = 63: padded to split by 2.
          "--config.model.preset=gpt-micro", "--config.model.vocab_size=64",
          "--config.train.batch_size=8",
          "--config.train.steps=10", "--config.train.eval_every=10",
          "--config.train.eval_batches=2", "--config.train.log_every=2",
          "--config.train.peak_flops=1e11", "--config.train.sample_tokens=4",
          "--config.mesh.fsdp=2", "--config.mesh.tensor=2", "--no-progress"]

  def start(command, devices, **env):
    return subprocess.Popen(command, cwd=REPO, env=_env(devices, **env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)

  def train(workdir, devices, **env):
    return start(args + [f"--workdir={tmp_path / workdir}",
                         f"--config.data.data_dir={tmp_path / workdir}_tfds"], devices, **env)

  coordinator = f"127.0.0.1:{_free_port()}"
  helper = [sys.executable, str(REPO / "tests" / "sharding_helper.py")]
  procs = {"gpt": start([*helper, "gpt"], 8), "others": start([*helper, "others"], 8),
           "one": train("one", 4)}
  for i, name in enumerate(("two", "second")):
    procs[name] = train("two", 2, JAXLLM_COORDINATOR=coordinator, JAXLLM_NUM_PROCESSES="2",
                        JAXLLM_PROCESS_ID=str(i))
  outputs = {name: proc.communicate(timeout=600) for name, proc in procs.items()}
  for name, proc in procs.items():
    assert proc.returncode == 0, (name, outputs[name][1][-4000:])
  helper = {}
  for part in ("gpt", "others"):
    for key, values in json.loads(outputs[part][0].strip().splitlines()[-1]).items():
      helper.setdefault(key, {}).update(values)
  result = types.SimpleNamespace(helper=helper, dir=tmp_path)
  for name in ("one", "two", "second"):
    setattr(result, name, outputs[name][0])
  return result


@pytest.fixture(scope="module")
def eight_devices(runs) -> dict:
  """What tests/sharding_helper.py measured on 8 simulated devices."""
  return runs.helper


# How far a mesh's losses may be from the one-device run's over the helper's 20 steps. In
# float32 the meshes differ only in the order of their sums, so they stay within a few units in
# the last place of a loss of ~4 (ulp 4.8e-7): measured 9.5e-7 at most (AMD EPYC, every family
# below), 1.2e-6 with the helper's XLA backend at optimisation level 0. bf16 operands keep 8
# significant bits: where a parameter differs by a float32 rounding between meshes, its bf16
# rounding can flip (2^-9 relative), and Adam carries that forward, so the differences grow
# from ~1e-6 at step 1 to 1.6e-4 at step 20 (AMD EPYC Zen 3, (1, 2, 4), at either level; 1.2e-4
# on Intel Xeon Sapphire Rapids, (2, 2, 2)). The bf16 bound is 3x that and still half of the
# 1e-3 a wrong sharding of one step would show (test_the_mesh_check_sees_a_1e_3_change).
FLOAT32_TOLERANCE = 5e-6
BF16_TOLERANCE = 5e-4


def _mesh_differences(losses: dict, prefix: str) -> dict[str, float]:
  """max |loss - the (1, 1, 1) loss| over the steps, for each run named `prefix (...)`."""
  family = {name: np.array(values) for name, values in losses.items()
            if name.startswith(prefix) and name[len(prefix):].lstrip().startswith(("(", "scan"))}
  reference = family[f"{prefix} (1, 1, 1)".lstrip()]
  return {name: float(np.abs(values - reference).max()) for name, values in family.items()}


def _family_losses(eight_devices, prefix: str,
                   tolerance: float = FLOAT32_TOLERANCE) -> tuple[np.ndarray, int]:
  """(the (1, 1, 1) losses, how many meshes) of the runs named `prefix ...`, after checking
  that every mesh of them gives those losses within `tolerance`."""
  differences = _mesh_differences(eight_devices["losses"], prefix)
  for name, difference in differences.items():
    assert difference <= tolerance, (name, difference)
  return np.array(eight_devices["losses"][f"{prefix} (1, 1, 1)".lstrip()]), len(differences)


def test_every_mesh_gives_the_same_losses(eight_devices):
  reference, meshes = _family_losses(eight_devices, "")  # scanned and remat'd stacks too
  assert len(reference) == 20
  assert reference[0] - reference[-1] > 0.5  # it learns, so a wrong gradient would show
  assert {"(8, 1, 1)", "(1, 8, 1)", "(2, 2, 2)", "(1, 2, 4)"} <= eight_devices["losses"].keys()
  assert meshes == 7


def test_the_mesh_check_sees_a_1e_3_change(eight_devices):
  for prefix, tolerance in (("", FLOAT32_TOLERANCE), ("bf16", BF16_TOLERANCE)):
    losses = dict(eight_devices["losses"])
    name = f"{prefix} (2, 2, 2)".lstrip()
    losses[name] = list(np.array(losses[name]) + 1e-3 * (np.arange(20) == 7))
    assert _mesh_differences(losses, prefix)[name] > tolerance
    with pytest.raises(AssertionError, match=re.escape(name)):
      _family_losses({"losses": losses}, prefix, tolerance)


def test_bf16_matmuls_give_the_same_losses_on_every_mesh(eight_devices):
  reference, meshes = _family_losses(eight_devices, "bf16", BF16_TOLERANCE)
  assert meshes == 3
  # ... and track float32's (measured 5.7e-4 over 20 steps; bf16 operands keep 8 bits).
  assert np.abs(reference - np.array(eight_devices["losses"]["(1, 1, 1)"])).max() <= 5e-3


def test_llama_components_give_the_same_losses_on_every_mesh(eight_devices):
  reference, meshes = _family_losses(eight_devices, "llama")
  assert meshes == 3 and reference[0] - reference[-1] > 0.5  # (1, 1, 1) and 2 tensor splits
  # Tensor axis 2: one of the 2 kv heads per device; tensor axis 4: replicated by the rule.
  split = eight_devices["layout"]["llama (2, 2, 2)"]["params"]["blocks_0/attn/kv/kernel"]
  assert (split["spec"], split["shard_shape"]) == ([["fsdp"], [], ["tensor"], []], [16, 2, 1, 8])
  whole = eight_devices["layout"]["llama (1, 2, 4)"]["params"]["blocks_0/attn/kv/kernel"]
  assert (whole["spec"], whole["shard_shape"]) == ([["fsdp"], [], [], []], [16, 2, 2, 8])
  assert eight_devices["errors"]["kv_heads"] == (
      "model.n_kv_head=2 is not divisible by mesh tensor=4 ('kv_heads' is split over tensor); "
      "replicate the kv heads (each device keeps all of them) with "
      "--config.mesh.rules=\"[('kv_heads', None)]\"")


def test_encoder_gives_the_same_losses_on_every_mesh(eight_devices):
  # Masked-LM steps of a BERT-style encoder: its logical axes split it like the GPT.
  reference, meshes = _family_losses(eight_devices, "bert")
  assert meshes == 3 and reference[0] - reference[-1] > 0.1
  layout = eight_devices["layout"]["bert (2, 2, 2)"]["params"]
  assert (layout["blocks_0/fc/kernel"]["spec"], layout["blocks_0/fc/kernel"]["shard_shape"]) == (
      [["fsdp"], ["tensor"]], [16, 64])
  assert layout["blocks_0/attn/qkv/kernel"]["spec"] == [["fsdp"], [], ["tensor"], []]


def test_fsdp_divides_parameter_and_optimizer_bytes(eight_devices):
  layout = eight_devices["layout"]["(1, 8, 1)"]
  for tree in ("params", "mu"):  # Adam's first moment is split like its parameter
    matrices = {name: x for name, x in layout[tree].items()
                if name.endswith(("kernel", "embedding"))}
    assert len(matrices) == 2 + 4 * TINY.n_layer  # wte, wpe; qkv, out, fc, proj per block
    for name, x in matrices.items():
      assert x["device_bytes"] * 8 == x["bytes"], (tree, name)
  assert layout["params"]["wte/embedding"]["shard_shape"] == [64, 4]  # d_model 32 / 8


def test_tensor_parallel_splits_heads_and_mlp_as_the_rules_say(eight_devices):
  params = eight_devices["layout"]["(1, 2, 4)"]["params"]  # fsdp 2, tensor 4
  expected = {  # name: (mesh axes per dimension, shard shape)
      "blocks_0/attn/qkv/kernel": ([["fsdp"], [], ["tensor"], []], [16, 3, 1, 8]),  # D 3 H K
      "blocks_0/attn/out/kernel": ([["tensor"], [], ["fsdp"]], [1, 8, 16]),  # H K D
      "blocks_0/mlp/fc/kernel": ([["fsdp"], ["tensor"]], [16, 32]),  # D F
      "blocks_0/mlp/proj/kernel": ([["tensor"], ["fsdp"]], [32, 16]),  # F D
      "blocks_0/mlp/fc/bias": ([["tensor"]], [32]),
      "wte/embedding": ([["tensor"], ["fsdp"]], [16, 16]),  # V D
  }
  for name, (spec, shard_shape) in expected.items():
    assert (params[name]["spec"], params[name]["shard_shape"]) == (spec, shard_shape), name
  scanned = eight_devices["layout"]["scan (2, 2, 2)"]["params"]
  assert scanned["blocks/mlp/fc/kernel"]["spec"] == [[], ["fsdp"], ["tensor"]]  # L D F
  assert scanned["blocks/mlp/fc/kernel"]["shard_shape"] == [2, 16, 64]


def test_remat_keeps_losses_and_cuts_step_memory(eight_devices):
  losses = eight_devices["losses"]
  assert losses["scan remat=full (2, 2, 2)"] == pytest.approx(
      losses["scan remat=none (2, 2, 2)"], abs=1e-6)
  temp = eight_devices["temp_bytes"]  # per device, measured 362,216 -> 176,776
  assert temp["full"] < 0.6 * temp["none"]


def test_errors_name_both_numbers(eight_devices):
  errors = eight_devices["errors"]
  assert all(message and "\n" not in message for message in errors.values()), errors
  assert "(3, 1, 1) needs 3 devices, but 8 are available" in errors["mesh"]
  assert "batch of 6 sequences" in errors["batch"] and "4 batch shards" in errors["batch"]
  assert "model.vocab_size=65 is not divisible by mesh tensor=2" in errors["vocab"]
  assert "set model.vocab_size=66" in errors["vocab"]
  assert "model.n_head=2 is not divisible by mesh tensor=4" in errors["heads"]


def test_rules_from_config_replace_the_defaults():
  rules = sharding.logical_rules([["vocab", None], ("embed", ["fsdp"]), ("experts", "tensor")])
  assert dict(rules)["vocab"] is None and dict(rules)["embed"] == "fsdp"
  assert [name for name, _ in rules][:3] == ["batch", "sequence", "vocab"]  # order kept
  assert rules[-1] == ("experts", "tensor")
  with pytest.raises(JaxllmError, match="unknown mesh axis 'model'"):
    sharding.logical_rules([("heads", "model")])


def test_state_shardings_match_the_state_tree():
  # What checkpoint restores build their targets from: one sharding per state leaf.
  optimizer = train_lib.make_optimizer(config_lib.default_config().train, 10)
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1}))
  shardings = sharding.state_shardings(*sharding.model_axes(GPT(TINY)), optimizer, mesh,
                                       sharding.logical_rules())
  state = jax.eval_shape(lambda: train_lib.create_train_state(
      init_params(GPT(TINY), jax.random.key(0)), optimizer, 0))
  assert jax.tree.structure(shardings) == jax.tree.structure(jax.tree.map(lambda _: 0, state))


def test_two_processes_train_as_one_with_four_devices(runs):
  assert "over 4 cpu device(s) in 1 process(es)" in runs.one
  assert "over 4 cpu device(s) in 2 process(es)" in runs.two
  # Process 1 prints nothing (gloo's C++ logs its connections to stdout itself, and its
  # "[Gloo] Rank <n>" prefix is sometimes flushed apart from the rest of the line, with or
  # without the rank).
  gloo = re.compile(r"^(\[Gloo\]|(\[Gloo\] Rank )?\d* ?is connected to \d+ peer ranks)")
  assert [line for line in runs.second.splitlines() if not gloo.match(line)] == []

  def losses(workdir):
    records = [json.loads(line) for line in (runs.dir / workdir / "metrics.jsonl").open()]
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in records]

  one, two = losses("one"), losses("two")
  assert [step for step, *_ in two] == [0, 2, 4, 6, 8, 10]  # written once, by process 0
  assert [step for step, *_ in one] == [step for step, *_ in two]
  for (_, loss_1, val_1), (_, loss_2, val_2) in zip(one, two):
    for a, b in ((loss_1, loss_2), (val_1, val_2)):
      assert (a is None) == (b is None) and (a is None or abs(a - b) <= 1e-4)
  assert one[-1][1] < one[1][1]  # training moved
  assert (runs.dir / "two" / "sample.txt").exists() and (runs.dir / "two" / "params").is_dir()


def test_multihost_start_up_errors(monkeypatch):
  # Both fail before jax.distributed is touched: this process stays single.
  monkeypatch.setenv("JAXLLM_COORDINATOR", "127.0.0.1:1234")
  monkeypatch.delenv("JAXLLM_NUM_PROCESSES", raising=False)
  monkeypatch.setenv("JAXLLM_PROCESS_ID", "0")
  with pytest.raises(JaxllmError, match="JAXLLM_COORDINATOR is set but JAXLLM_NUM_PROCESSES"):
    multihost.initialize()
  monkeypatch.setenv("JAXLLM_DISTRIBUTED", "yes")
  with pytest.raises(JaxllmError, match="JAXLLM_DISTRIBUTED must be auto or off, got 'yes'"):
    multihost.initialize()
  monkeypatch.setenv("JAXLLM_DISTRIBUTED", "off")
  multihost.initialize()  # off wins over the coordinator
  assert jax.process_count() == 1
