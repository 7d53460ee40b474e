"""`jaxllm preflight`: a run's steps compiled for a Cloud TPU topology on this CPU machine
(libtpu's compile-only devices), their memory per chip, FLOPs and collectives; `--find`; the
sweep's pruning of trials that do not fit; Cloud TPU's type names."""

import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

import jaxllm
from jaxllm.config import load_experiment
from jaxllm.errors import JaxllmError
from jaxllm.models.gpt import count_params
from jaxllm.tools import launch, preflight, preflight_report, sweep, tpu

REPO = pathlib.Path(__file__).resolve().parents[1]
SHAKESPEARE = str(REPO / "experiments/shakespeare_char.py")
# gpt-micro's sizes (2 layers, d_model 64, context 32) with a 256-token vocabulary, on all the
# topology's chips: a train step compiles in ~2 s.
SMALL = ["model.preset=gpt-micro", "model.vocab_size=256", "mesh.data=-1",
         "train.batch_size=16"]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="module")
def v5e_8():
  if importlib.util.find_spec("libtpu") is None:
    if IN_CI:
      pytest.fail("libtpu is not installed (the tpu-preflight extra) [CI=true: a failure]")
    pytest.skip("libtpu is not installed: pip install -e '.[tpu-preflight]'")
  return preflight.target("v5litepod-8")


def _config(*overrides):
  return jaxllm.load_config(SHAKESPEARE, [*SMALL, *overrides])


def test_cloud_tpu_names():
  rows = {name: (t.chips, t.topology, t.hosts) for name in
          ("v4-8", "v4-32", "v5p-8", "v5p-128", "v5litepod-1", "v5litepod-8", "v5e-16",
           "v5litepod-256", "v6e-8", "v6e-64") for t in [tpu.tpu_type(name)]}
  assert rows == {
      "v4-8": (4, "v4:2x2x1", 1), "v4-32": (16, "v4:2x2x4", 4), "v5p-8": (4, "v5p:2x2x1", 1),
      "v5p-128": (64, "v5p:4x4x4", 16), "v5litepod-1": (1, "v5e:1x1", 1),
      "v5litepod-8": (8, "v5e:2x4", 1), "v5e-16": (16, "v5e:4x4", 4),
      "v5litepod-256": (256, "v5e:16x16", 64), "v6e-8": (8, "v6e:2x4", 1),
      "v6e-64": (64, "v6e:8x8", 16)}
  # `jaxllm launch tpu --accelerator` reads the same words.
  assert [launch.tpu_hosts(n) for n in ("v5litepod-16", "v4-32", "v6e-8")] == [4, 4, 1]
  for bad, message in (("v5e-6", "not a slice size"), ("v3-8", "not a TPU type jaxllm knows"),
                       ("tpu", "not a TPU type")):
    with pytest.raises(JaxllmError, match=message):
      tpu.tpu_type(bad)


def test_collectives_are_counted_from_the_program_text():
  text = """
  %all-gather.1 = bf16[128,256]{1,0:T(8,128)} all-gather(%p), dimensions={0}
  %all-reduce.2 = (f32[4,8]{1,0}, f32[16]{0}, f32[]{:T(128)}, f32[], f32[], /*index=5*/f32[2]) all-reduce(%a, %b), to_apply=%add
  %all-gather-start.3 = (f32[8]{0}, f32[64]{0}) all-gather-start(%q), dimensions={0}
  %all-gather-done.3 = f32[64]{0} all-gather-done(%all-gather-start.3)
  %reduce-scatter.4 = f32[2,3]{1,0} reduce-scatter(%r), dimensions={0}
  """
  assert preflight.collectives(text) == {
      "all-gather": [2, 128 * 256 * 2 + 64 * 4], "all-reduce": [1, (32 + 16 + 3 + 2) * 4],
      "reduce-scatter": [1, 6 * 4]}


def test_without_libtpu_the_error_names_the_extra(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "libtpu" else real(name, *a))
  monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)
  with pytest.raises(JaxllmError, match=r"pip install -e '\.\[tpu-preflight\]'"):
    preflight.target("v5litepod-8")


def test_memory_grows_with_the_batch_and_falls_with_fsdp(v5e_8):
  small = preflight.preflight(_config("train.batch_size=16"), v5e_8, decode_slots=8)
  large = preflight.preflight(_config("train.batch_size=128"), v5e_8)
  assert [p.name for p in small.programs] == ["train step", "eval step",
                                              "decode step (8 slots)"]
  assert small.fits and large.fits
  assert large.train.peak_bytes > small.train.peak_bytes
  assert large.programs[1].peak_bytes > small.programs[1].peak_bytes  # the eval step's too
  assert large.batch_bytes == 8 * small.batch_bytes == 128 * 2 * 32 * 4 // 8

  # Data parallel: every chip holds every parameter (float32) and Adam's two moments, exact.
  d, vocab, context, layers = 64, 256, 32, 2  # gpt-micro, no biases (nanoGPT's), tied
  block = d + 3 * d * d + d * d + d + 4 * d * d + 4 * d * d  # LN scales, qkv, out, MLP
  n = vocab * d + context * d + layers * block + d
  assert small.parameters == n
  assert small.params_bytes == 4 * n
  assert small.opt_state_bytes == 8 * n + 8  # mu, nu; Adam's and the schedule's int32 counts
  # FSDP over the 8 chips: each holds 1/8 of every weight's d_model side.
  fsdp = preflight.preflight(_config("mesh.data=1", "mesh.fsdp=8"), v5e_8, evaluation=False)
  assert fsdp.params_bytes < small.params_bytes / 4
  assert fsdp.opt_state_bytes < small.opt_state_bytes / 4
  data = lambda p: p.argument_bytes + p.output_bytes - p.alias_bytes + p.temp_bytes  # noqa: E731
  assert data(fsdp.train) < data(small.train) / 4  # at this size the program's code is most


def test_parameter_bytes_equal_the_shards_of_the_model_parameters(v5e_8):
  report = preflight.preflight(_config("mesh.data=2", "mesh.fsdp=4"), v5e_8, evaluation=False)
  task, _, _ = preflight._task(_config("mesh.data=2", "mesh.fsdp=4"))
  shapes = jax.eval_shape(task.init_params)
  axes = jax.tree.leaves(task.param_axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  expected = 0
  for shape, spec in zip(jax.tree.leaves(shapes), axes):
    elements = math.prod(shape.shape)
    # "embed" is split over fsdp (4); nothing else is split on a (2, 4, 1) mesh.
    expected += elements // 4 * 4 if "embed" in tuple(spec) else elements * 4
  assert report.params_bytes == expected
  assert report.opt_state_bytes == 2 * expected + 8
  assert report.parameters == count_params(shapes)


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_flops_agree_with_the_6n_estimate(v5e_8, grad_accum):
  # gpt-nano (4 layers, d_model 128, context 64): at gpt-micro's d_model 64 the elementwise
  # work (norms, softmax, AdamW) is 11% of the matmuls'; at GPT-2 small's, 5%.
  report = preflight.preflight(
      _config("model.preset=gpt-nano", f"train.grad_accum={grad_accum}"), v5e_8,
      evaluation=False)
  tokens, d, layers, context = 16 * 64, 128, 4, 64
  per_token = 6 * (report.parameters - context * d) + 12 * layers * d * context
  assert report.model_flops == pytest.approx(per_token * tokens / 8, rel=1e-12)
  assert report.compiled_flops == pytest.approx(report.model_flops, rel=0.10)


def test_an_out_of_memory_refusal_is_a_program_that_does_not_fit():
  message = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory "
             "space hbm. Used 17.90G of 15.75G hbm. Exceeded hbm capacity by 2.15G.\n\nTotal "
             "hbm usage >= 18.15G:")

  class Refused:
    def compile(self):
      raise RuntimeError(message)

  program = preflight._compile("eval step", lambda: Refused())
  assert not program.fits and program.error == message.splitlines()[0]
  with pytest.raises(RuntimeError, match="something else"):
    preflight._compile("train step", lambda: (_ for _ in ()).throw(RuntimeError("something else")))


def test_an_oversized_batch_does_not_fit_and_exits_non_zero(tmp_path, v5e_8):
  small = preflight.preflight(_config(), v5e_8, evaluation=False).train.peak_bytes
  out = tmp_path / "report.json"
  limit = small * 1.05 / 2**30
  result = subprocess.run(
      [sys.executable, "-m", "jaxllm.cli", "preflight", "--config", SHAKESPEARE,
       "--topology", "v5litepod-8", "--decode-slots", "0", "--json", str(out),
       "--hbm-gib", str(limit), *(f"--config.{o}" for o in SMALL),
       "--config.train.batch_size=128"], cwd=REPO, capture_output=True, text=True)
  assert result.returncode == 1, result.stdout + result.stderr
  assert result.stdout.rstrip().endswith("does not fit")
  report = json.loads(out.read_text())
  assert report["fits"] is False and report["memory_bytes"] == int(limit * 2**30)
  train = report["programs"][0]
  assert train["fits"] is False and train["peak_bytes"] > report["memory_bytes"]
  assert "DOES NOT FIT" in next(line for line in result.stdout.splitlines()
                                if line.startswith("train step"))


def test_find_batch_returns_the_largest_that_fits():
  # Simulated CPU devices: each row of gpt-micro's step takes ~0.5 MB, so ~3 rows fit.
  where = preflight.target("cpu-1", memory_gib=3.3e6 / 2**30)
  batch, reports = preflight_report.find_batch(_config("mesh.data=1"), where, log=lambda _: None)
  by_batch = {r.batch_size: r for r in reports}
  assert batch >= 2
  assert by_batch[batch].fits and by_batch[batch].train.peak_bytes <= where.memory_bytes
  assert not by_batch[batch + 1].fits  # the next batch was compiled, and does not fit
  assert by_batch[batch + 1].train.peak_bytes > where.memory_bytes
  assert all(r.fits == (r.batch_size <= batch) for r in reports)


def test_sweep_prunes_a_trial_that_does_not_fit_without_training_it(tmp_path, shared_data):
  experiment = tmp_path / "tiny.py"
  experiment.write_text(f"""
from jaxllm.config import load_config
def get_config():
  c = load_config({SHAKESPEARE!r})
  c.model.preset = "gpt-micro"
  c.data.dataset, c.data.tokenizer, c.data.path = "text", "char", {str(shared_data / "the-verdict.txt")!r}
  c.data.train_split, c.data.val_split = "train", ""
  c.train.steps, c.train.eval_every, c.train.eval_batches = 3, 3, 1
  c.train.peak_flops, c.train.sample_tokens, c.train.warmup_steps = 1e11, 0, 0
  return c
SWEEP = {{"params": {{"train.batch_size": [8, 256]}}}}
""")
  # 8 rows take ~5 MB, 256 rows ~137 MB (simulated CPU devices; see the test above).
  where = preflight.target("cpu-1", memory_gib=32 / 1024)
  spec = sweep.sweep_spec(load_experiment(experiment)[0])
  study = sweep.run(experiment, spec, tmp_path / "sweep", fit=where)
  trials = {t.params["train.batch_size"]: t for t in study.trials}
  assert trials[8].state.name == "COMPLETE" and trials[256].state.name == "PRUNED"
  assert trials[256].user_attrs["preflight_peak_bytes"] > where.memory_bytes
  assert trials[8].user_attrs["preflight_peak_bytes"] <= where.memory_bytes
  assert (pathlib.Path(trials[8].user_attrs["workdir"]) / "checkpoints").is_dir()
  assert not (pathlib.Path(trials[256].user_attrs["workdir"]) / "config.json").exists()


def test_two_slices_put_the_data_axis_across_them():
  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed")
  where = preflight.target("v5litepod-4", slices=2)
  assert len(where.devices) == 8 and where.slices == 2
  report = preflight.preflight(_config("mesh.data=2", "mesh.fsdp=4"), where, evaluation=False)
  assert report.fits
  from jaxllm.training import sharding
  mesh = sharding.make_mesh(_config("mesh.data=2", "mesh.fsdp=4").mesh, list(where.devices))
  assert [{d.slice_index for d in mesh.devices[i].flat} for i in range(2)] == [{0}, {1}]
  with pytest.raises(JaxllmError, match="multiple of the 2 slices"):
    sharding.make_mesh(_config("mesh.data=1", "mesh.fsdp=8").mesh, list(where.devices))


def test_simulated_cpu_devices_without_libtpu():
  where = preflight.target("cpu-1", memory_gib=0.5)
  assert where.memory_bytes == 2**29 and len(where.devices) == 1
  report = preflight.preflight(_config("mesh.data=1"), where, decode_slots=2)
  assert report.fits and report.params_bytes == 4 * report.parameters
  assert report.train.argument_bytes >= report.params_bytes + report.opt_state_bytes
  with pytest.raises(JaxllmError, match="xla_force_host_platform_device_count=64"):
    preflight.target("cpu-64")
  np.testing.assert_equal(report.to_json()["fits"], True)


def test_evaluation_in_microbatches_gives_the_same_sums_in_less_memory():
  # An evaluation batch holds train.batch_size rows; with train.grad_accum = A it is summed in
  # A slices, as training's microbatches are, so it fits where training does.
  from jaxllm.training import sharding

  task, _, _ = preflight._task(_config("mesh.data=1", "train.batch_size=32"))
  params = jax.jit(task.init_params)()
  rng = np.random.default_rng(0)
  batch = {"inputs": rng.integers(0, 256, (32, 32), dtype=np.int32),
           "targets": rng.integers(0, 256, (32, 32), dtype=np.int32),
           "weights": (rng.random((32, 32)) < 0.8).astype(np.float32)}
  mesh = sharding.make_mesh(_config("mesh.data=1").mesh, jax.devices()[:1])
  rules = sharding.logical_rules()
  shardings = jax.tree.map(lambda _: sharding.replicated(mesh), params)
  whole = sharding.jit_eval_step(task.eval_fn, shardings, mesh, rules)
  sliced = sharding.jit_eval_step(task.eval_fn, shardings, mesh, rules, microbatches=4)
  a, b = whole(params, batch), sliced(params, batch)
  assert float(a["count"]) == float(b["count"]) == float(batch["weights"].sum())
  np.testing.assert_allclose(float(b["loss"]), float(a["loss"]), rtol=1e-6)
  temp = [step.lower(params, batch).compile().memory_analysis().temp_size_in_bytes
          for step in (whole, sliced)]
  assert temp[1] < temp[0] / 2, temp


def test_find_remat_compiles_every_setting_at_the_batch():
  where = preflight.target("cpu-1", memory_gib=64 / 1024)
  reports = preflight_report.find_remat(_config("mesh.data=1", "train.batch_size=64"), where,
                                        log=lambda _: None)
  assert [tuple(r.overrides.values()) for r in reports] == [
      (remat, scan) for scan in (False, True) for remat in ("none", "dots", "full")]
  temp = {tuple(r.overrides.values()): r.train.temp_bytes for r in reports}
  # On XLA:CPU remat saves memory with scanned layers (docs/scaling.md): full keeps least.
  assert temp[("full", True)] < temp[("dots", True)] < temp[("none", True)]
  assert all(r.fits == (r.train.peak_bytes <= where.memory_bytes) for r in reports)
