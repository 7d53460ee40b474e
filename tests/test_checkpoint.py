"""Checkpoints: exact resume after SIGKILL and SIGTERM, resharding, strict and damaged restores."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxllm import cli
from jaxllm import config as config_lib
from jaxllm.data.tokenizer import CharTokenizer
from jaxllm.errors import JaxllmError
from jaxllm.models.gpt import GPT, init_params
from jaxllm.training import checkpoint as checkpoint_lib
from jaxllm.training import rundir as run_io
from jaxllm.training import step as train_lib

REPO = pathlib.Path(__file__).resolve().parents[1]

# `jaxllm train` in a subprocess, with checkpoint.save wrapped to kill the process right after
# the save at step KILL_AT: SIGKILL once the save is on disk, or SIGTERM (the loop then saves
# at the next step boundary and exits with status 75).
RUNNER = textwrap.dedent("""
    import os, signal, sys
    from jaxllm import cli
    from jaxllm.training import checkpoint
    kill_at, how = int(sys.argv[1]), sys.argv[2]
    save = checkpoint.save
    def save_then_kill(manager, step, *args, **kwargs):
      started = save(manager, step, *args, **kwargs)
      if step == kill_at:
        if how == "SIGKILL":
          manager.wait_until_finished()
          os.kill(os.getpid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGTERM)
      return started
    checkpoint.save = save_then_kill
    sys.exit(cli.main(sys.argv[3:]))
""")

STEPS = 12


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  """A persistent XLA compilation cache: runs after the first load its programs, not compile."""
  return {"JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("xla-cache")),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def _start(env, workdir, corpus, *extra, kill_at=-1, how="none"):
  args = ["train", "--config", "experiments/shakespeare_char.py", "--workdir", str(workdir),
          "--config.model.preset=gpt-micro", "--config.data.dataset=text",
          f"--config.data.path={corpus}", "--config.data.train_split=train",
          "--config.data.tokenizer=char", f"--config.train.steps={STEPS}",
          "--config.train.batch_size=4", "--config.train.eval_every=6",
          "--config.train.eval_batches=2", "--config.train.log_every=2",
          "--config.train.warmup_steps=2", "--config.train.peak_flops=1e11",
          "--config.train.sample_tokens=4", "--config.checkpoint.every_steps=4", "--no-progress",
          *extra]
  # One TFDS dir per run lineage: parallel runs never prepare the same dataset at once.
  env = {**os.environ, **env, "TFDS_DATA_DIR": str(workdir.parent / f"tfds-{workdir.name}")}
  return subprocess.Popen([sys.executable, "-c", RUNNER, str(kill_at), how, *args], cwd=REPO,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process):
  out, err = process.communicate(timeout=300)
  return process.returncode, out, err


def _records(workdir):
  keys = ("step", "loss", "grad_norm", "lr", "train_loss", "val_loss")
  return [{k: r[k] for k in keys if k in r}
          for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())]


def _params(workdir):
  return ocp.StandardCheckpointer().restore((workdir / "params").absolute())


def _steps(workdir):
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir())


def test_resume_after_sigkill_and_sigterm_is_exact(tmp_path, shared_data, compile_cache):
  corpus = tmp_path / "verdict.txt"
  corpus.write_text((shared_data / "the-verdict.txt").read_text())
  reference, killed, stopped = tmp_path / "reference", tmp_path / "killed", tmp_path / "stopped"
  status, _, err = _finish(_start(compile_cache, reference, corpus))  # n steps, uninterrupted
  assert status == 0, err
  expected = _records(reference)
  assert [r["step"] for r in expected if "loss" in r] == [2, 4, 6, 8, 10, 12]
  assert _steps(reference) == [4, 8, 12]

  # Killed right after the save at step 8; stopped by SIGTERM during step 6, so it saves at
  # step 6, off the every-4-steps schedule. Meanwhile a fresh start (resume=false) over a copy
  # of the reference run, initialised from its final parameters (train.init_from).
  pretrained = tmp_path / "pretrained"
  shutil.copytree(reference, pretrained)
  runs = [_start(compile_cache, killed, corpus, kill_at=8, how="SIGKILL"),
          _start(compile_cache, stopped, corpus, kill_at=5, how="SIGTERM"),
          _start(compile_cache, reference, corpus, "--config.checkpoint.resume=false",
                 f"--config.train.init_from={pretrained}", "--config.train.steps=2")]
  (kill_status, _, _), (stop_status, _, stop_err), (new_status, _, new_err) = map(_finish, runs)
  assert kill_status == -9
  assert stop_status == 75, stop_err
  assert f"jaxllm: preempted (SIGTERM) after step 6; checkpoint saved in {stopped}" in stop_err
  assert (_steps(killed), _steps(stopped)) == ([4, 8], [4, 6])
  assert new_status == 0, new_err
  restarted = _records(reference)
  assert [r["step"] for r in restarted] == [0, 2]  # the old history and checkpoints are gone
  assert _steps(reference) == [2]
  # It starts from the reference's final parameters: its step-0 evaluation is the reference's
  # last one (the same evaluation batches).
  assert restarted[0]["val_loss"] == pytest.approx(expected[-1]["val_loss"], abs=1e-6)
  assert restarted[0]["val_loss"] < expected[0]["val_loss"] - 0.1

  runs = [_start(compile_cache, killed, corpus), _start(compile_cache, stopped, corpus)]
  (kill_status, kill_out, kill_err), (stop_status, stop_out, stop_err) = map(_finish, runs)
  assert (kill_status, stop_status) == (0, 0), (kill_err, stop_err)
  assert "resuming from step 8" in kill_out and "resuming from step 6" in stop_out
  for run in (killed, stopped):
    assert _records(run) == expected  # every logged loss, bit for bit
    same = jax.tree.map(np.array_equal, _params(run), _params(pretrained))
    assert all(jax.tree.leaves(same))
  assert (_steps(killed), _steps(stopped)) == ([4, 8, 12], [6, 8, 12])


# Saves on an 8-device mesh (8, 1, 1) with the embedding split over "data", then restores onto
# (1, 2, 4) with the embedding over "fsdp" and the qkv kernel over "tensor", and onto 1 device.
MESH_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, ml_collections, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jaxllm import config as config_lib
    from jaxllm.training import checkpoint
    from jaxllm.training import sharding
    from jaxllm.training import step as train_lib
    from jaxllm.models.gpt import GPT, init_params

    config = config_lib.default_config()
    config.model.preset = "gpt-micro"
    model = GPT(config_lib.model_config(config.model, vocab_size=64))
    optimizer = train_lib.make_optimizer(config.train, 100)
    create = lambda: train_lib.create_train_state(
        init_params(model, jax.random.key(0)), optimizer, seed=1)

    def mesh(data, fsdp, tensor, devices=None):
      sizes = ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))
      return sharding.make_mesh(sizes, devices)

    def shardings(mesh, embed_axis, qkv_axis):
      def spec(path, x):
        name = jax.tree_util.keystr(path)
        if "wte" in name and x.ndim == 2:
          return NamedSharding(mesh, P(embed_axis, None))
        if "qkv" in name and "kernel" in name:
          return NamedSharding(mesh, P(None, None, None, qkv_axis))
        return NamedSharding(mesh, P())
      return jax.tree_util.tree_map_with_path(spec, jax.eval_shape(create))

    def values(state):
      return jax.device_get(state.replace(rng=jax.random.key_data(state.rng)))

    saved = jax.jit(create, out_shardings=shardings(mesh(8, 1, 1), "data", None))()
    saved = saved.replace(step=saved.step + 7)
    assert saved.params["wte"]["embedding"].sharding.spec == P("data", None)
    config.checkpoint.every_steps = 0
    manager = checkpoint.make_manager(sys.argv[1], config.checkpoint)
    checkpoint.save(manager, 7, saved, config, {"kind": "char", "chars": "ab"}, force=True)
    manager.wait_until_finished()

    for target_mesh, embed_axis, qkv_axis in ((mesh(1, 2, 4), "fsdp", "tensor"),
                                              (mesh(1, 1, 1, jax.devices()[:1]), None, None)):
      target = checkpoint.abstract_state(create, shardings(target_mesh, embed_axis, qkv_axis))
      state, step = checkpoint.restore(manager, target)
      embedding = state.params["wte"]["embedding"]
      kernel = state.params["blocks_0"]["attn"]["qkv"]["kernel"]
      identical = jax.tree.map(np.array_equal, values(state), values(saved))
      print(dict(target_mesh.shape), step, int(state.step), embedding.sharding.spec,
            kernel.sharding.spec, len(embedding.sharding.device_set),
            all(jax.tree.leaves(identical)))
""")


def test_restore_onto_another_mesh(tmp_path, compile_cache):
  result = subprocess.run([sys.executable, "-c", MESH_SCRIPT, str(tmp_path / "ckpt")], cwd=REPO,
                          env={**os.environ, **compile_cache}, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert lines == [
      "{'data': 1, 'fsdp': 2, 'tensor': 4} 7 7 P('fsdp', None) "
      "P(None, None, None, 'tensor') 8 True",
      "{'data': 1, 'fsdp': 1, 'tensor': 1} 7 7 P(None, None) "
      "P(None, None, None, None) 1 True",
  ]


def _checkpoint_config(**overrides):
  checkpoint = config_lib.default_config().checkpoint
  checkpoint.update(overrides)
  return checkpoint


def _tiny_state(d_model=64):
  config = config_lib.default_config()
  config.model.preset = "gpt-micro"
  config.model.d_model = d_model
  model = GPT(config_lib.model_config(config.model, vocab_size=40))
  optimizer = train_lib.make_optimizer(config.train, 100)
  create = lambda: train_lib.create_train_state(
      init_params(model, jax.random.key(0)), optimizer, seed=1)
  return config, create


def _save_steps(directory, steps, **options):
  config, create = _tiny_state()
  manager = checkpoint_lib.make_manager(directory, _checkpoint_config(**options))
  state = create()
  for step in steps:
    state = state.replace(step=state.step + 1,
                          params=jax.tree.map(lambda x: x + 1.0, state.params))
    checkpoint_lib.save(manager, step, state, config, {"kind": "char", "chars": "ab"},
                        val_loss=10.0 - step, force=True)
  manager.wait_until_finished()
  return create


def _target(create):
  return checkpoint_lib.abstract_state(create, jax.sharding.SingleDeviceSharding(jax.devices()[0]))


def test_save_policy_and_keep(tmp_path):
  config, create = _tiny_state()
  manager = checkpoint_lib.make_manager(tmp_path, _checkpoint_config(every_steps=3, keep=2,
                                                                     keep_best=1))
  state, saved = create(), []
  for step in range(1, 11):
    state = state.replace(step=state.step + 1)
    # The lowest validation loss is at step 3: kept besides the latest two.
    val_loss = 1.0 if step == 3 else 5.0 if step % 3 == 0 else None
    if checkpoint_lib.save(manager, step, state, config, {}, val_loss=val_loss,
                           force=step == 10):
      saved.append(step)
  manager.wait_until_finished()
  assert saved == [3, 6, 9, 10]
  assert manager.all_steps() == [3, 9, 10]
  restored, data_step = checkpoint_lib.restore(manager, _target(create))
  assert (data_step, int(restored.step)) == (10, 10)
  assert json.loads((tmp_path / "10" / "config" / "metadata").read_text())["model"]["preset"] == (
      "gpt-micro")


def test_mismatched_checkpoint_is_one_line_error(tmp_path):
  _save_steps(tmp_path, [1])
  _, other_model = _tiny_state(d_model=32)
  manager = checkpoint_lib.make_manager(tmp_path, _checkpoint_config())
  with pytest.raises(JaxllmError) as error:
    checkpoint_lib.restore(manager, _target(other_model))
  message = str(error.value)
  assert "\n" not in message
  assert ("'params.blocks_0.attn.out.bias' is (64,) float32 there but (32,) float32 in the "
          "configured model" in message)
  assert "checkpoint.resume=false" in message


def _truncate_files(directory):
  for path in directory.rglob("*"):
    if path.is_file():
      path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


def test_damaged_latest_falls_back_with_a_warning(tmp_path, capsys):
  create = _save_steps(tmp_path, [1, 2])
  _truncate_files(tmp_path / "2" / "state")
  (tmp_path / "3.orbax-checkpoint-tmp-123").mkdir()  # a save cut short by a crash
  manager = checkpoint_lib.make_manager(tmp_path, _checkpoint_config())
  state, step = checkpoint_lib.restore(manager, _target(create))
  assert (step, int(state.step)) == (1, 1)
  scale = np.asarray(state.params["ln_f"]["scale"])
  assert np.array_equal(scale, np.full(64, 2.0, np.float32))  # ones + 1
  err = capsys.readouterr().err
  assert "jaxllm: warning: skipping" in err and "3.orbax-checkpoint-tmp-123" in err
  assert f"jaxllm: warning: skipping checkpoint {tmp_path / '2'}" in err

  _truncate_files(tmp_path / "1" / "state")
  with pytest.raises(JaxllmError, match="no complete checkpoint in"):
    checkpoint_lib.restore(checkpoint_lib.make_manager(tmp_path, _checkpoint_config()),
                           _target(create))


def test_params_for_init_from_must_match(tmp_path):
  _, create = _tiny_state()
  run_io.save_params(tmp_path, jax.device_get(create().params))
  _, other_model = _tiny_state(d_model=32)
  with pytest.raises(JaxllmError) as error:
    run_io.load_params(tmp_path, _target(other_model).params)
  assert "\n" not in str(error.value)
  assert "'blocks_0.attn.out.bias' is (64,) float32 there but (32,) float32" in str(error.value)
  params = run_io.load_params(tmp_path, _target(create).params)
  assert np.array_equal(params["wte"]["embedding"], create().params["wte"]["embedding"])


def _thread_count_once_settled(at_most: int, seconds: float = 5.0) -> int:
  # A restore's asyncio helper threads end on their own, a moment after it returns.
  deadline = time.monotonic() + seconds
  while threading.active_count() > at_most and time.monotonic() < deadline:
    time.sleep(0.02)
  return threading.active_count()


def test_parameter_saves_and_loads_end_their_threads(tmp_path, monkeypatch):
  _, create = _tiny_state()
  params = jax.device_get(create().params)
  run_io.save_params(tmp_path, params)  # JAX's and Orbax's threads that live for the process
  run_io.load_params(tmp_path, _target(create).params)
  # Every checkpointer kept alive, as any reference (a traceback, a sweep's bookkeeping) keeps
  # it: only closing it ends its threads.
  kept = []

  class Kept(ocp.StandardCheckpointer):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      kept.append(self)

  monkeypatch.setattr(ocp, "StandardCheckpointer", Kept)
  before = _thread_count_once_settled(at_most=1)
  for _ in range(5):
    run_io.save_params(tmp_path, params)
    run_io.load_params(tmp_path, _target(create).params)
  assert len(kept) == 10
  assert _thread_count_once_settled(at_most=before) == before  # unclosed: one more per save


def _overwrite_middle(directory):
  """Bytes overwritten inside the largest file: raw array data, read back without an error."""
  largest = max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  data = bytearray(largest.read_bytes())
  data[len(data) // 2:len(data) // 2 + 256] = b"\xff" * 256
  largest.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["overwritten bytes", "other arrays than saved"])
def test_damaged_checkpoint_is_set_aside_for_the_step_before(tmp_path, capsys, damage):
  create = _save_steps(tmp_path, [1, 2])
  if damage == "overwritten bytes":  # TensorStore may or may not notice
    _overwrite_middle(tmp_path / "2" / "state")
    reason = ""
  else:  # arrays read back without an error that are not the ones saved
    stored = tmp_path / "2" / "fingerprint" / "metadata"
    prints = json.loads(stored.read_text())
    prints["state"][0][0] += 1
    stored.write_text(json.dumps(prints))
    reason = "its arrays do not match the fingerprint saved with them; "
  manager = checkpoint_lib.make_manager(tmp_path, _checkpoint_config())
  state, step = checkpoint_lib.restore(manager, _target(create))
  assert (step, int(state.step)) == (1, 1)
  assert np.array_equal(state.params["ln_f"]["scale"], np.full(64, 2.0, np.float32))
  err = capsys.readouterr().err
  assert f"jaxllm: warning: skipping checkpoint {tmp_path / '2'}: {reason}" in err
  assert "moved to damaged-2" in err
  # Set aside, so the resumed run saves step 2 again.
  assert manager.all_steps() == [1] and (tmp_path / "damaged-2").is_dir()
  assert checkpoint_lib.save(manager, 2, state, config_lib.default_config(), {}, force=True)
  manager.wait_until_finished()
  assert manager.all_steps() == [1, 2]


@pytest.mark.parametrize("damage", ["middle of the data", "start of the data", "metadata"])
def test_damaged_parameters_are_a_one_line_error(tmp_path, capsys, damage):
  config, create = _tiny_state()
  params = jax.device_get(create().params)
  run_io.save_run_files(tmp_path, config, CharTokenizer.from_corpus("abcdefghij" * 4))
  (tmp_path / "config.json").write_text(json.dumps({**config.to_dict(), "model": {
      **config.to_dict()["model"], "vocab_size": 40}}))
  run_io.save_params(tmp_path, params)
  assert cli.main(["generate", "--workdir", str(tmp_path), "--prompt", "ab",
                   "--max-new-tokens", "2"]) == 0
  capsys.readouterr()
  if damage == "middle of the data":  # read back silently: only the fingerprint tells
    _overwrite_middle(tmp_path / "params")
  else:
    name = "_METADATA" if damage == "metadata" else max(
        (p for p in (tmp_path / "params").rglob("*") if p.is_file()),
        key=lambda p: p.stat().st_size).relative_to(tmp_path / "params")
    path = tmp_path / "params" / name
    path.write_bytes(b"\xff" * 64 + path.read_bytes()[64:])
  assert cli.main(["generate", "--workdir", str(tmp_path), "--prompt", "ab",
                   "--max-new-tokens", "2"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1, err
  assert err[0].startswith(f"jaxllm: error: parameters in {tmp_path / 'params'} cannot be read: "
                           f"the folder is damaged or incomplete")
