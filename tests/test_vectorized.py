"""Vectorised trials: K optimizer settings trained at once equal K separate runs."""

import csv
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from jaxllm import config as config_lib
from jaxllm.errors import JaxllmError
from jaxllm.tools import vectorized
from jaxllm.training import loop as trainer

REPO = pathlib.Path(__file__).resolve().parents[1]
# Learning rates where 20 steps train stably: past ~3e-3 with this warmup the loss turns
# back up, and float32 rounding of batched and unbatched matmuls then grows to ~2e-5.
LEARNING_RATES = [float(x) for x in np.geomspace(1e-4, 1.5e-3, 8)]


def _config(shared_data, tmp_path):
  config = config_lib.load_config(REPO / "experiments" / "shakespeare_char.py")
  config.model.preset = "gpt-micro"
  config.data.update(dataset="text", tokenizer="char", train_split="train", val_split="",
                     path=str(shared_data / "the-verdict.txt"), data_dir=str(tmp_path / "tfds"))
  config.train.update(steps=20, eval_every=10, batch_size=4, eval_batches=2, log_every=1,
                      peak_flops=1e11, sample_tokens=0, warmup_steps=4)
  return config


def _metrics(workdir):
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return ([r["loss"] for r in records if "loss" in r],
          [r["val_loss"] for r in records if "val_loss" in r])


# The trials run split over 8 simulated devices (mesh.data=8, one trial per device): a fresh
# process, as the device count is fixed when jax starts. (One device: the test below.)
SPLIT_RUN = """
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
from jaxllm import config
from jaxllm.tools import vectorized
vectorized.run(config.from_dict(json.loads(sys.argv[1])), json.loads(sys.argv[2]), sys.argv[3:])
"""
# Separate runs of trials (learning rate, weight decay), one after another, in a process of
# their own: half of them run beside this process's half.
SEPARATE_RUNS = """
import json, sys
from jaxllm import compile_cache, config
from jaxllm.training import loop
compile_cache.enable()  # as in the session's process (tests/conftest.py names the folder)
for values, workdir in zip(json.loads(sys.argv[2]), sys.argv[3:]):
  alone = config.from_dict(json.loads(sys.argv[1]))
  alone.train.learning_rate = values["train.learning_rate"]
  alone.train.weight_decay = values["train.weight_decay"]
  loop.run(alone, workdir, progress=False)
"""


def _separately(config, trials, tmp_path):
  """Runs each trial alone into tmp_path/s<i>: the second half in a subprocess (its own TFDS
  folder, the same text), the first half here, at the same time."""
  half = len(trials) // 2
  other = config_lib.from_dict(config.to_dict())
  other.data.data_dir = str(tmp_path / "tfds-separate")
  process = subprocess.Popen(
      [sys.executable, "-c", SEPARATE_RUNS, json.dumps(other.to_dict()),
       json.dumps(trials[half:]), *[str(tmp_path / f"s{i}") for i in range(half, len(trials))]],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  for i, values in enumerate(trials[:half]):
    alone = config_lib.from_dict(config.to_dict())
    alone.train.learning_rate, alone.train.weight_decay = (values["train.learning_rate"],
                                                           values["train.weight_decay"])
    trainer.run(alone, tmp_path / f"s{i}", progress=False)
  _, err = process.communicate(timeout=300)
  assert process.returncode == 0, err[-3000:]
  return [json.loads((tmp_path / f"s{i}" / "eval.json").read_text())["val_loss"]
          for i in range(len(trials))]


def test_eight_trials_at_once_equal_eight_runs(tmp_path, shared_data):
  config = _config(shared_data, tmp_path)
  trials = [{"train.learning_rate": lr, "train.weight_decay": 0.1 * (i % 2)}
            for i, lr in enumerate(LEARNING_RATES)]
  split_config = config_lib.from_dict(config.to_dict())
  split_config.mesh.data = 8
  together = subprocess.Popen(  # runs beside the separate runs below
      [sys.executable, "-c", SPLIT_RUN, json.dumps(split_config.to_dict()), json.dumps(trials),
       *[str(tmp_path / f"v{i}") for i in range(8)]], cwd=REPO, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)
  separate = _separately(config, trials, tmp_path)
  out, err = together.communicate(timeout=300)
  assert together.returncode == 0, err[-3000:]
  assert "8 vectorised trials of train.learning_rate, train.weight_decay: 20 steps, 1 per " \
         "device on 8 devices" in out
  for i, values in enumerate(trials):
    (losses, val_losses), (ref_losses, ref_val) = _metrics(tmp_path / f"v{i}"), _metrics(
        tmp_path / f"s{i}")
    assert len(losses) == 20 and len(val_losses) == 3
    np.testing.assert_allclose(losses, ref_losses, atol=1e-5, err_msg=str(values))
    np.testing.assert_allclose(val_losses, ref_val, atol=1e-5, err_msg=str(values))
    saved = json.loads((tmp_path / f"v{i}" / "eval.json").read_text())
    assert saved["val_loss"] == pytest.approx(separate[i], abs=1e-5)
  assert len({round(v, 4) for v in separate}) == 8  # eight different trials


def test_trials_of_other_seeds_and_init_scales_equal_their_runs(tmp_path, shared_data):
  # On one device. Each seed: its own initialisation, batches, evaluation batches, dropout.
  config = _config(shared_data, tmp_path)
  config.train.update(steps=10, eval_every=5)
  config.model.dropout = 0.1
  trials = [{"train.seed": 1, "train.learning_rate": 1e-3},
            {"train.seed": 2, "train.learning_rate": 5e-4, "train.warmup_steps": 2,
             "model.embedding_init_std": 0.05}]
  vectorized.run(config, trials, [tmp_path / "v1", tmp_path / "v2"])
  for i, values in enumerate(trials, 1):
    alone = config_lib.from_dict(config.to_dict())
    config_lib.apply_overrides(alone, [f"{k}={v}" for k, v in values.items()])
    trainer.run(alone, tmp_path / f"s{i}", progress=False)
    for together, separate in zip(_metrics(tmp_path / f"v{i}"), _metrics(tmp_path / f"s{i}")):
      np.testing.assert_allclose(together, separate, atol=1e-5, err_msg=str(values))
  assert _metrics(tmp_path / "v1")[1][0] != _metrics(tmp_path / "v2")[1][0]  # other inits


def test_only_optimizer_keys_vary_and_trials_split_over_data_only(tmp_path, shared_data):
  with pytest.raises(JaxllmError, match="'model.n_layer' cannot vary across vectorised trials"):
    vectorized.run(_config(shared_data, tmp_path), [{"model.n_layer": 1}], [tmp_path / "x"])
  with pytest.raises(JaxllmError, match="train.warmup_steps must be 0 or more, got -5"):
    vectorized.run(_config(shared_data, tmp_path), [{"train.warmup_steps": 10},
                                                    {"train.warmup_steps": -5}],
                   [tmp_path / "x", tmp_path / "y"])
  with pytest.raises(JaxllmError, match="trial axis over mesh.data only; set mesh.fsdp=1"):
    vectorized._trial_shardings(config_lib.from_dict({"mesh": {"fsdp": 2}}).mesh, 4)


def test_a_vectorised_grid_sweep(tmp_path, shared_data):
  experiment = tmp_path / "tiny.py"
  experiment.write_text(
      "from jaxllm import config as c\n"
      f"BASE = {_config(shared_data, tmp_path).to_dict()!r}\n"
      "def get_config():\n  return c.from_dict(BASE)\n")
  result = subprocess.run(
      [sys.executable, "-m", "jaxllm.cli", "sweep", "--config", str(experiment), "--sweep-dir",
       str(tmp_path / "sweep"), "--param", "train.learning_rate=3e-4,6e-4,1e-3",
       "--param", "train.weight_decay=0.0,0.1", "--vectorize", "4"], cwd=REPO,
      capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.count("vectorised trials of") == 2  # groups of 4 and 2
  with open(tmp_path / "sweep" / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 6 and {r["state"] for r in rows} == {"complete"}
  assert {(r["train.learning_rate"], r["train.weight_decay"]) for r in rows} == {
      (lr, wd) for lr in ("0.0003", "0.0006", "0.001") for wd in ("0.0", "0.1")}
