"""The one trainer on finetuning tasks: every mesh, exact resume, gradient accumulation."""

import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from safetensors.numpy import save_file
from test_checkpoint import RUNNER, _finish

from jaxllm import cli, tasks
from jaxllm import config as config_lib
from jaxllm.training import loop as trainer
from jaxllm.training import rundir as run_io
from jaxllm.training import step as train_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
# The spam classifier CPU experiment, short: 8 steps of batch 8, every loss logged.
SPAM = ["finetune", "--config", "experiments/spam_classifier_cpu.py", "--no-progress",
        "--config.classifier.max_length=48", "--config.train.epochs=0",
        "--config.train.steps=8", "--config.train.log_every=1", "--config.train.eval_every=4",
        "--config.train.eval_batches=2", "--config.train.peak_flops=1e11",
        "--config.train.warmup_steps=2"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """A GPT-2 run directory from `jaxllm convert` (random weights in Hugging Face's layout:
  2 layers, 4 heads, d_model 32, context 64, GPT-2's vocabulary)."""
  folder = tmp_path_factory.mktemp("hf")
  rng = np.random.default_rng(0)
  shapes = {"wte.weight": (50257, 32), "wpe.weight": (64, 32), "ln_f.weight": (32,),
            "ln_f.bias": (32,)}
  for i in range(2):
    shapes.update({f"h.{i}.ln_1.weight": (32,), f"h.{i}.ln_1.bias": (32,),
                   f"h.{i}.attn.c_attn.weight": (32, 96), f"h.{i}.attn.c_attn.bias": (96,),
                   f"h.{i}.attn.c_proj.weight": (32, 32), f"h.{i}.attn.c_proj.bias": (32,),
                   f"h.{i}.ln_2.weight": (32,), f"h.{i}.ln_2.bias": (32,),
                   f"h.{i}.mlp.c_fc.weight": (32, 128), f"h.{i}.mlp.c_fc.bias": (128,),
                   f"h.{i}.mlp.c_proj.weight": (128, 32), f"h.{i}.mlp.c_proj.bias": (32,)})
  save_file({name: (0.1 * rng.standard_normal(shape)).astype(np.float32)
             for name, shape in shapes.items()}, folder / "model.safetensors")
  (folder / "config.json").write_text(json.dumps({
      "model_type": "gpt2", "vocab_size": 50257, "n_positions": 64, "n_embd": 32, "n_head": 4,
      "n_layer": 2, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5}))
  out = tmp_path_factory.mktemp("converted") / "gpt2"
  assert cli.main(["convert", "--from", str(folder), "--out", str(out)]) == 0
  return out


@pytest.fixture(scope="module")
def spam(tmp_path_factory, shared_data):
  """The first 1,200 lines of SMSSpamCollection: 181 spam, balanced and split 253/36/73 (no
  split a multiple of the batch of 8, so every final report pads a last batch), a quarter of
  the whole file's 1,045/149/300, which keeps each run's final report over them short."""
  path = tmp_path_factory.mktemp("spam") / "SMSSpamCollection"
  lines = (shared_data / "SMSSpamCollection").read_text(encoding="utf-8").splitlines()
  path.write_text("\n".join(lines[:1200]) + "\n", encoding="utf-8")
  return path


def _start_finetune(mesh, workdir, converted, spam, *extra, float64=False):
  """The spam finetune from `converted` on a mesh of simulated CPU devices, started (a
  subprocess: the device count is fixed when jax starts); `_results` waits for it."""
  devices = int(np.prod(mesh))
  env = {**os.environ,
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
         "TFDS_DATA_DIR": str(workdir.parent / f"tfds-{workdir.name}")}
  if float64:
    env["JAX_ENABLE_X64"] = "1"
    extra = (*extra, "--config.model.dtype=float64")
  args = [*SPAM, "--workdir", str(workdir), f"--config.train.init_from={converted}",
          f"--config.data.path={spam}",
          f"--config.mesh.data={mesh[0]}", f"--config.mesh.fsdp={mesh[1]}",
          f"--config.mesh.tensor={mesh[2]}",
          # GPT-2's 50,257 ids do not split over tensor=2: keep the vocabulary whole.
          "--config.mesh.rules=[('vocab', None)]", *extra]
  return subprocess.Popen([sys.executable, "-m", "jaxllm.cli", *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _results(process, workdir):
  """A finished `_start_finetune` run's metrics, eval.json and stdout."""
  code, out, err = _finish(process)
  assert code == 0, err[-3000:]
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return records, json.loads((workdir / "eval.json").read_text()), out


def _finetunes_on(meshes, tmp_path, converted, spam, *extra, float64=False):
  """{mesh: _results} of the spam finetune on each of `meshes`, all started at once so they
  share the cores."""
  workdirs = {mesh: tmp_path / "x".join(map(str, mesh)) for mesh in meshes}
  processes = {mesh: _start_finetune(mesh, workdirs[mesh], converted, spam, *extra,
                                     float64=float64) for mesh in meshes}
  return {mesh: _results(processes[mesh], workdirs[mesh]) for mesh in meshes}


def _parameter_mib(stdout):
  return float(re.search(r"per device: parameters ([\d.]+) MiB", stdout).group(1))


def test_finetuning_gives_the_same_losses_on_every_mesh(tmp_path, converted, spam):
  """Every mesh computes the same steps; only the order of sums differs (a loss split over
  devices, a matmul tiled another way). In float64 that rounding is ~1e-16, so the meshes
  must agree to 1e-12. (In float32 the whole experiment's 390 steps drift apart on meshes,
  up to 0.7, where float64 stays within 2e-9: benchmarks/mesh_equivalence.py. The LoRA test
  below checks a float32 finetune on a mesh. (8,1,1) is left to that script and to the
  pretraining meshes of tests/test_sharding.py, to keep the suite short.)"""
  runs = _finetunes_on([(1, 1, 1), (1, 8, 1), (2, 2, 2)], tmp_path, converted, spam,
                       float64=True)
  reference, figures, stdout = runs[(1, 1, 1)]
  losses = [r["loss"] for r in reference if "loss" in r]
  assert len(losses) == 8 and len(set(losses)) == 8 and "float64" in stdout
  # MFU's 6N leaves out the token embedding, which a classifier only looks up: 25,472 of
  # the backbone's 1,635,744 parameters; attention over the 48 tokens the texts are padded
  # to (classifier.max_length), not the context of 64: 6 * 25,472 + 12 * 2 * 32 * 48 FLOP
  # per token (0.20 MFLOP at the context length).
  assert "MFU: 0.19 MFLOP/token (6N + 12 L d T; T = 48 in the first batch" in stdout
  for mesh, (records, mesh_figures, _) in runs.items():
    np.testing.assert_allclose([r["loss"] for r in records if "loss" in r], losses, rtol=0,
                               atol=1e-12, err_msg=str(mesh))
    assert mesh_figures["test_accuracy"] == figures["test_accuracy"], mesh
    assert mesh_figures["test"]["confusion"] == figures["test"]["confusion"], mesh
  # FSDP splits the converted backbone (and the head) over the 8 devices.
  assert _parameter_mib(runs[(1, 8, 1)][2]) < _parameter_mib(stdout) / 7


def test_lora_adapters_split_like_their_kernels(tmp_path, converted, spam):
  lora = ["--config.lora.rank=4", "--config.train.trainable=lora,head",
          "--config.train.learning_rate=3e-3"]
  runs = _finetunes_on([(1, 1, 1), (1, 2, 4)], tmp_path, converted, spam, *lora)
  (one, _, _), (split, _, stdout) = runs[(1, 1, 1)], runs[(1, 2, 4)]
  np.testing.assert_allclose([r["loss"] for r in split if "loss" in r],
                             [r["loss"] for r in one if "loss" in r], atol=1e-4)
  assert "(lora,head, LoRA rank 4)" in stdout


def test_finetune_resumes_exactly_after_sigkill_and_sigterm(tmp_path, spam):
  def start(workdir, kill_at=-1, how="none"):
    args = [*SPAM, "--workdir", str(workdir), "--config.train.steps=12",
            f"--config.data.path={spam}", "--config.model.n_layer=1", "--config.model.d_model=32",
            "--config.model.context_length=48", "--config.train.eval_every=6",
            "--config.checkpoint.every_steps=4"]
    env = {**os.environ, "TFDS_DATA_DIR": str(tmp_path / "tfds")}
    return subprocess.Popen([sys.executable, "-c", RUNNER, str(kill_at), how, *args], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

  def outputs(workdir):
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    keys = ("step", "loss", "grad_norm", "lr", "accuracy", "val_loss", "val_accuracy")
    saved = jax.tree.leaves(run_io.load_finetuned(workdir)[2])
    assert len(saved) == 2 + 12 + 2 + 2  # embeddings, a block, the final norm, the head
    return ([{k: r[k] for k in keys if k in r} for r in records], saved,
            json.loads((workdir / "eval.json").read_text()))

  reference, killed, stopped = tmp_path / "reference", tmp_path / "killed", tmp_path / "stopped"
  code, _, err = _finish(start(reference))
  assert code == 0, err[-2000:]
  # Then, together (their programs now in the compilation cache): killed right after the save
  # at step 8; stopped by SIGTERM during step 6, so it saves at the end of step 6 and exits 75.
  (kill_code, _, _), (stop_code, _, stop_err) = map(_finish, [start(killed, 8, "SIGKILL"),
                                                              start(stopped, 5, "SIGTERM")])
  assert (kill_code, stop_code) == (-9, 75), stop_err[-2000:]
  assert "jaxllm: preempted (SIGTERM) after step 6" in stop_err
  for code, out, err in map(_finish, [start(killed), start(stopped)]):
    assert code == 0, err[-2000:]
    assert "resuming from step" in out
  expected_records, expected_params, expected_figures = outputs(reference)
  assert [r["step"] for r in expected_records if "loss" in r] == list(range(1, 13))
  for workdir in (killed, stopped):
    records, params, figures = outputs(workdir)
    assert records == expected_records  # every logged float, bit for bit
    for a, b in zip(params, expected_params, strict=True):
      np.testing.assert_array_equal(a, b)
    for split in ("train", "val", "test"):  # the final report's figures too
      for key in (f"{split}_loss", f"{split}_accuracy", split):
        assert figures[key] == expected_figures[key], key


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_end_with_the_one_process_figures(tmp_path, converted, spam):
  """The final report runs on the mesh in every process, as the periodic evaluation does:
  two processes of 2 devices (joined as `jaxllm launch local` joins them) write the eval.json
  of one process with 4, and no process gathers the whole parameters (a model that needs
  FSDP to fit would not fit there)."""
  runner = ("import sys\nfrom jaxllm import cli\nfrom jaxllm.training import multihost\n"
            "def gathered(tree):\n  raise RuntimeError('whole parameters gathered')\n"
            "multihost.host_copy = gathered\nsys.exit(cli.main(sys.argv[1:]))\n")
  args = [sys.executable, "-c", runner, *SPAM, f"--config.train.init_from={converted}",
          f"--config.data.path={spam}", "--config.mesh.fsdp=4",
          "--config.mesh.rules=[('vocab', None)]"]
  # The session's compilation cache (tests/conftest.py) stays: without it, ~/.cache.
  base = {k: v for k, v in os.environ.items()
          if not k.startswith("JAXLLM_") or k == "JAXLLM_COMPILATION_CACHE"}

  def start(workdir, devices, **env):
    env = {**base, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "JAX_PLATFORMS": "cpu", "TFDS_DATA_DIR": str(tmp_path / f"tfds-{workdir}"), **env}
    return subprocess.Popen([*args, "--workdir", str(tmp_path / workdir)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

  coordinator = f"127.0.0.1:{_free_port()}"
  procs = [start("one", 4)] + [
      start("two", 2, JAXLLM_COORDINATOR=coordinator, JAXLLM_NUM_PROCESSES="2",
            JAXLLM_PROCESS_ID=str(i)) for i in range(2)]
  outputs = [_finish(p) for p in procs]
  for code, _, err in outputs:
    assert code == 0, err[-3000:]
  assert "over 4 cpu device(s) in 2 process(es)" in outputs[1][1]
  gloo = re.compile(r"^(\[Gloo\]|(\[Gloo\] Rank )?\d* ?is connected to \d+ peer ranks)")
  assert [line for line in outputs[2][1].splitlines() if not gloo.match(line)] == []
  one, two = (json.loads((tmp_path / w / "eval.json").read_text()) for w in ("one", "two"))
  for split in ("train", "val", "test"):
    assert two[split] == one[split], split  # counts, confusion, precision, recall, F1
    assert two[f"{split}_accuracy"] == one[f"{split}_accuracy"]
    assert two[f"{split}_loss"] == pytest.approx(one[f"{split}_loss"], rel=1e-6)
  assert one["test"]["count"] == 73 and one["train"]["count"] == 253


def test_a_resumed_finetune_reads_no_init_from_weights(tmp_path, converted, spam):
  """A run holding a checkpoint restores onto the abstract state: nothing is initialised and
  train.init_from's weights are not read again (here they are gone), and the losses are the
  uninterrupted run's, bit for bit."""
  start = tmp_path / "start"
  shutil.copytree(converted, start)

  def launch(workdir, kill_at=-1, how="none"):
    args = [*SPAM, "--workdir", str(workdir), f"--config.train.init_from={start}",
            f"--config.data.path={spam}", "--config.checkpoint.every_steps=4"]
    env = {**os.environ, "TFDS_DATA_DIR": str(tmp_path / f"tfds-{workdir.name}")}
    return subprocess.Popen([sys.executable, "-c", RUNNER, str(kill_at), how, *args], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

  reference, killed = tmp_path / "reference", tmp_path / "killed"
  (code, _, err), (killed_code, _, _) = map(_finish, [launch(reference),
                                                      launch(killed, 4, "SIGKILL")])
  assert (code, killed_code) == (0, -9), err[-2000:]
  shutil.rmtree(start / "params")  # the starting weights: a resume must not need them
  code, out, err = _finish(launch(killed))
  assert code == 0, err[-2000:]
  assert "resuming from step 4" in out

  def records(workdir):
    keys = ("step", "loss", "grad_norm", "lr", "accuracy", "val_loss", "val_accuracy")
    return [{k: r[k] for k in keys if k in r}
            for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())]

  expected = records(reference)
  assert [r["step"] for r in expected if "loss" in r] == list(range(1, 9))
  assert records(killed) == expected
  figures = [json.loads((w / "eval.json").read_text()) for w in (reference, killed)]
  for key in ("test_accuracy", "test_loss", "val_loss", "train_loss", "test"):
    assert figures[1][key] == figures[0][key], key


@pytest.mark.parametrize("task", ["instruct", "classify", "dpo", "mlm-bert", "classify-bert"])
def test_gradient_accumulation_gives_the_whole_batch_gradient(tmp_path, shared_data, task):
  # Microbatches of one batch weigh by their items (tokens of uneven, loss-masked lengths for
  # instruct and dpo, masked positions for mlm): two of them give the whole batch's gradient.
  config = config_lib.default_config()
  task, _, architecture = task.partition("-")
  config.train.task, config.train.seed, config.train.batch_size = task, 3, 8
  config.model.architecture = architecture or None
  config.model.n_layer, config.model.n_head, config.model.d_model = 1, 2, 32
  config.model.context_length = 128
  config.classifier.update(text_column="1", label_column="0", labels="ham,spam", max_length=64)
  if task == "mlm":  # The Verdict's characters
    config.data.update(dataset="text", tokenizer="char")
  file = {"classify": "SMSSpamCollection", "instruct": "instruction-data.json",
          "dpo": "instruction-data-with-preference.json", "mlm": "the-verdict.txt"}[task]
  if task == "dpo":  # a run to start from: the same tiny model, untrained
    run = tmp_path / "start"
    run.mkdir()
    start = tasks.build(config_lib.from_dict({**config.to_dict(), "train": {
        **config.to_dict()["train"], "task": "instruct"}, "data": {
        **config.to_dict()["data"], "path": str(shared_data / "instruction-data.json")}}))
    run_io.save_run_files(run, config, start.tokenizer)
    run_io.save_params(run, jax.jit(start.init_params)()["backbone"])
    config.train.init_from = str(run)
  config.data.path = str(shared_data / file)
  gradients = []
  for accum in (1, 2):
    config.train.grad_accum = accum
    task_ = tasks.build(config_lib.from_dict(config.to_dict()))
    params = jax.jit(task_.init_params)()
    if task == "dpo":  # a policy away from the reference: a gradient that is not zero
      params["backbone"] = jax.tree.map(lambda x: x * 1.1, params["backbone"])
    sgd = optax.sgd(1.0)  # the parameter change is the gradient
    step = jax.jit(trainer.task_step(task_, sgd))
    state = train_lib.create_train_state(params, sgd, seed=0)
    new_state, metrics = step(state, task_.train_batch(0, None))
    gradients.append((jax.tree.map(lambda a, b: a - b, state.params, new_state.params),
                      float(metrics["loss"])))
  (whole, loss_whole), (split, loss_split) = gradients
  assert loss_split == pytest.approx(loss_whole, rel=1e-6)
  largest = max(float(np.abs(g).max()) for g in jax.tree.leaves(whole))
  assert largest > 1e-4
  for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(split)):
    np.testing.assert_allclose(a, b, atol=1e-6)
