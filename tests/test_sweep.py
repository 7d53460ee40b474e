"""`jaxllm sweep`: grid, random and TPE sweeps on an Optuna study; resume after SIGKILL, two
workers on one study, pruning, the results table."""

import csv
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import optuna
import pytest

from jaxllm.errors import JaxllmError
from jaxllm.tools import sweep, sweep_results

REPO = pathlib.Path(__file__).resolve().parents[1]

# The Shakespeare char task at the smallest size: 20 steps of a 1-2 layer model on The Verdict.
EXPERIMENT = """
from jaxllm.config import load_config
def get_config():
  c = load_config({shakespeare!r})
  c.model.preset = "gpt-micro"
  c.data.dataset, c.data.tokenizer, c.data.path = "text", "char", {corpus!r}
  c.data.train_split, c.data.val_split = "train", ""
  c.train.steps, c.train.eval_every, c.train.batch_size, c.train.eval_batches = 20, 5, 4, 2
  c.train.peak_flops, c.train.sample_tokens, c.train.warmup_steps = 1e11, 0, 2
  c.checkpoint.every_steps = 5
  return c
"""


@pytest.fixture
def experiment(tmp_path, shared_data):
  path = tmp_path / "tiny.py"
  path.write_text(EXPERIMENT.format(shakespeare=str(REPO / "experiments/shakespeare_char.py"),
                                    corpus=str(shared_data / "the-verdict.txt")))
  return path


def _sweep(experiment, sweep_dir, *args):
  env = {**os.environ, "TFDS_DATA_DIR": str(sweep_dir.parent / "tfds")}
  return subprocess.Popen(
      [sys.executable, "-m", "jaxllm.cli", "sweep", "--config", str(experiment),
       "--sweep-dir", str(sweep_dir), *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)


def _rows(sweep_dir):
  with open(sweep_dir / "results.csv") as f:
    return list(csv.DictReader(f))


def _study(sweep_dir, name="jaxllm-tiny"):
  return optuna.load_study(study_name=name, storage=f"sqlite:///{sweep_dir / 'study.db'}")


def test_specs_from_the_command_line():
  assert sweep.parse_param("train.learning_rate=1e-3,3e-3") == (
      "train.learning_rate", [1e-3, 3e-3])
  assert sweep.parse_param("model.n_layer=int:1:4") == (
      "model.n_layer", {"type": "int", "low": 1, "high": 4})
  spec = sweep.sweep_spec(None, ["train.learning_rate=1e-3,3e-3", "model.n_layer=1,2,3"])
  assert (spec["sampler"], spec["trials"], spec["metric"]) == ("grid", 6, "val_loss")
  with pytest.raises(JaxllmError, match="needs a number of trials"):
    sweep.sweep_spec(None, ["train.learning_rate=loguniform:1e-4:1e-2"])
  with pytest.raises(JaxllmError, match="'train.lr' is not a config key"):
    sweep.sweep_spec(None, ["train.lr=1,2"])
  with pytest.raises(JaxllmError, match="grid sweep needs a list"):
    sweep.sweep_spec(None, ["train.learning_rate=uniform:0:1"], sampler="grid", trials=3)


@pytest.mark.parametrize("param, message", [
    ("train.learning_rate=loguniform:abc:1e-2",
     r"--param 'train.learning_rate=loguniform:abc:1e-2': low 'abc' is not a number"),
    ("train.learning_rate=loguniform:1e-2", r"1e-2': needs loguniform:low:high"),
    ("train.learning_rate=loguniform:0:1e-2",
     r"a loguniform range needs 0 < low <= high, got 0 and 0.01"),
    ("model.n_layer=int:4:1", r"'model.n_layer': int needs low <= high, got 4 and 1"),
])
def test_malformed_distributions_are_one_line_errors(param, message):
  with pytest.raises(JaxllmError, match=message):
    sweep.sweep_spec(None, [param], trials=2)


def test_curves_read_a_metrics_file_cut_by_a_kill(tmp_path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  (tmp_path / "trial_000").mkdir()
  (tmp_path / "trial_000" / "metrics.jsonl").write_text(
      '{"step": 5, "val_loss": 3.0}\n{"step": 10, "val_loss": 2.5}\n{"step": 15, "val_')
  rows = [{"trial": 0, "best": True, "workdir": str(tmp_path / "trial_000")}]
  sweep_results._curves(rows, tmp_path, plt)
  assert (tmp_path / "curves.png").stat().st_size > 0


def test_grid_killed_midway_finishes_only_what_is_missing(tmp_path, experiment):
  sweep_dir = tmp_path / "grid"
  grid = ["--param", "train.learning_rate=1e-3,1e-2", "--param", "model.n_layer=1,2",
          "--grace-seconds", "2"]
  first = _sweep(experiment, sweep_dir, *grid)
  # SIGKILL while the third trial trains, after its first checkpoint is complete (a save
  # still in flight is a "5.orbax-checkpoint-tmp" folder, which a rerun rightly skips).
  deadline = time.time() + 240
  checkpoints = sweep_dir / "trial_002" / "checkpoints"
  while not (checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())):
    assert first.poll() is None and time.time() < deadline, first.stdout.read()
    time.sleep(0.2)
  first.send_signal(signal.SIGKILL)
  first.wait()
  done = {row["trial"]: row for row in _rows(sweep_dir)}
  assert sorted(done) == ["0", "1"]
  stamps = {n: (sweep_dir / f"trial_00{n}" / "eval.json").stat().st_mtime for n in done}
  # The killed trial's heartbeat (every second) goes stale after 2 s: by the time the rerun
  # has started (seconds of imports) and looks.
  time.sleep(3)

  second = _sweep(experiment, sweep_dir, *grid)
  out, _ = second.communicate(timeout=300)
  assert second.returncode == 0, out
  rows = _rows(sweep_dir)
  assert len(rows) == 4 and {r["state"] for r in rows} == {"complete"}, out
  assert {(r["train.learning_rate"], r["model.n_layer"]) for r in rows} == {
      (lr, n) for lr in ("0.001", "0.01") for n in ("1", "2")}
  # Finished trials were not run again: the rerun ran two (the grid point left and the
  # killed trial's retry), and the retry resumed in the killed trial's directory.
  assert {n: (sweep_dir / f"trial_00{n}" / "eval.json").stat().st_mtime for n in done} == stamps
  started = re.findall(r"^trial (\d+): ", out, flags=re.MULTILINE)
  assert len(started) == 2 and min(map(int, started)) >= 3, out
  retried = [r for r in rows if r["workdir"].endswith("trial_002")]
  assert len(retried) == 1 and int(retried[0]["trial"]) >= 3, rows
  assert re.search(r"resuming from step (5|10|15) ", out), out
  assert sum(r["best"] == "True" for r in rows) == 1
  assert (sweep_dir / "results.md").read_text().count("(best)") == 1
  for name in ("curves.png", "val_loss_vs_train.learning_rate.png",
               "val_loss_vs_model.n_layer.png"):
    assert (sweep_dir / name).stat().st_size > 5_000


def test_two_workers_share_one_study(tmp_path, experiment):
  sweep_dir = tmp_path / "random"
  args = ["--param", "train.learning_rate=loguniform:1e-4:1e-2", "--sampler", "random",
          "--trials", "4", "--seed", "1"]
  first, second = _sweep(experiment, sweep_dir, *args), _sweep(experiment, sweep_dir, *args)
  outputs = [p.communicate(timeout=300)[0] for p in (first, second)]
  assert [p.returncode for p in (first, second)] == [0, 0], outputs
  ran = [{line.split(":")[0] for line in out.splitlines() if line.startswith("trial ")}
         for out in outputs]
  assert ran[0] and ran[1] and not ran[0] & ran[1]  # both worked, on disjoint trials
  trials = _study(sweep_dir).get_trials()
  complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
  assert len(complete) == 4 and len(_rows(sweep_dir)) == 4


def test_tpe_with_median_pruning_prunes(tmp_path, experiment):
  sweep_dir = tmp_path / "tpe"
  process = _sweep(experiment, sweep_dir, "--param", "train.learning_rate=loguniform:1e-6:3e-2",
                   "--sampler", "tpe", "--pruner", "median", "--trials", "6", "--seed", "0")
  out, _ = process.communicate(timeout=600)
  assert process.returncode == 0, out
  rows = _rows(sweep_dir)
  states = [r["state"] for r in rows]
  # Trials 0-3 are TPE's random start (two of them pruned, measured), 4 and 5 its own.
  assert len(rows) == 6 and states.count("pruned") >= 1, states
  assert "| pruned |" in (sweep_dir / "results.md").read_text()
