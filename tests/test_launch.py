"""`jaxllm launch`: dry runs of the cluster launchers, the TPU restart rule on stand-in commands,
SLURM step detection, and local jobs: tiny children that print a lot or fail, a real
2-process training run."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from unittest import mock

import pytest

from jaxllm import cli
from jaxllm.tools import launch

REPO = pathlib.Path(__file__).resolve().parents[1]
JOB = ["train", "--config", "experiments/shakespeare_char.py", "--workdir", "/shared/runs/x",
       "--config.mesh.fsdp=-1", "--no-progress"]


def _lines(capsys, *options):
  assert cli.main(["launch", *options, "--dry-run", "--", *JOB]) == 0
  return capsys.readouterr().out.splitlines()


def test_tpu_slice_dry_run(capsys):
  lines = _lines(capsys, "tpu", "--name", "run1", "--zone", "us-west4-a", "--accelerator",
                 "v5litepod-16", "--spot", "--repository", "https://example.org/jaxllm.git")
  assert lines[0].startswith("# v5litepod-16: 4 host(s), each running the same command")
  create, install, run = lines[1:4]
  assert create == ("gcloud compute tpus tpu-vm create run1 --zone=us-west4-a "
                    "--accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite --spot")
  assert "--worker=all" in install and "git clone https://example.org/jaxllm.git" in install
  # Every worker runs the same command; JAX numbers the 4 processes from the metadata.
  assert run == ("gcloud compute tpus tpu-vm ssh run1 --zone=us-west4-a --worker=all "
                 "'--command=cd jaxllm && JAXLLM_DISTRIBUTED=auto .venv/bin/jaxllm train "
                 "--config experiments/shakespeare_char.py --workdir /shared/runs/x "
                 "--config.mesh.fsdp=-1 --no-progress'")
  assert lines[4] == ("# exit 75 (preempted) or a lost slice (a state other than READY from "
                      "gcloud compute tpus tpu-vm describe run1 --zone=us-west4-a "
                      "'--format=value(state)'): gcloud compute tpus tpu-vm delete run1 "
                      "--zone=us-west4-a --quiet, then create, install and run again (resuming "
                      "from checkpoints), up to 3 times; any other failure ends the job")
  # Deleted once, at the end.
  assert lines[5:] == ["gcloud compute tpus tpu-vm delete run1 --zone=us-west4-a --quiet"]
  assert [launch.tpu_hosts(t) for t in ("v5litepod-8", "v5litepod-16", "v5litepod-64",
                                        "v4-32", "v4-8")] == [1, 4, 16, 4, 1]


def test_xpk_dry_run_maps_preempted_to_a_restart(capsys):
  (line,) = _lines(capsys, "xpk", "--cluster", "c1", "--workload", "w1", "--tpu-type",
                   "v5litepod-16", "--num-slices", "2", "--docker-image", "gcr.io/p/jaxllm")
  assert line.startswith("xpk workload create --cluster=c1 --workload=w1 "
                         "--tpu-type=v5litepod-16 --num-slices=2 --max-restarts=3 "
                         "--docker-image=gcr.io/p/jaxllm ")
  assert ("JAXLLM_DISTRIBUTED=auto jaxllm train --config experiments/shakespeare_char.py"
          in line)
  assert "if [ $status -eq 75 ]; then exit 42; fi; exit $status" in line


def test_slurm_dry_run_two_nodes(capsys):
  lines = _lines(capsys, "slurm", "--nodes", "2", "--gpus-per-node", "4", "--time", "2:00:00")
  assert lines[0] == "# 2 node(s) x 4 GPU(s): 8 processes, ids from SLURM_PROCID"
  for option in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--requeue",
                 "--signal=TERM@120", "--time=2:00:00"):
    assert f"#SBATCH {option}" in lines
  assert ("srun .venv/bin/jaxllm train --config experiments/shakespeare_char.py --workdir "
          "/shared/runs/x --config.mesh.fsdp=-1 --no-progress") in lines
  assert 'if [ $status -eq 75 ]; then scontrol requeue "$SLURM_JOB_ID"; fi' in lines
  assert lines[-1] == "sbatch jaxllm.sbatch"


def test_nothing_to_launch_is_one_line(capsys):
  assert cli.main(["launch", "local", "--processes", "2"]) == 2
  assert capsys.readouterr().err.startswith("jaxllm: error: jaxllm launch needs the command")


def test_local_two_processes_equal_one(tmp_path, shared_data):
  corpus = tmp_path / "verdict.txt"
  corpus.write_text((shared_data / "the-verdict.txt").read_text())

  def job(name):
    return ["train", "--config", "experiments/shakespeare_char.py",
            f"--workdir={tmp_path / name}", f"--config.data.data_dir={tmp_path / name}_tfds",
            "--config.model.preset=gpt-micro", "--config.data.dataset=text",
            f"--config.data.path={corpus}", "--config.data.train_split=train",
            "--config.data.val_split=", "--config.data.tokenizer=char",
            "--config.train.batch_size=8", "--config.train.steps=6",
            "--config.train.eval_every=6", "--config.train.eval_batches=2",
            "--config.train.log_every=2", "--config.train.peak_flops=1e11",
            "--config.train.sample_tokens=4", "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
            "--config.model.vocab_size=64"]  # 63 characters, padded to split over tensor=2

  env = {k: v for k, v in os.environ.items() if not k.startswith("JAXLLM_COORDINATOR")}

  def start(command, **extra):
    return subprocess.Popen([sys.executable, "-m", "jaxllm.cli", *command], cwd=REPO,
                            env={**env, **extra}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)

  # Both at once, sharing the cores.
  runs = [start(job("one"), XLA_FLAGS="--xla_force_host_platform_device_count=4"),
          start(["launch", "local", "--processes", "2", "--devices-per-process", "2", "--",
                 *job("two")])]
  (_, one_err), (two_out, two_err) = (run.communicate(timeout=300) for run in runs)
  assert runs[0].returncode == 0, one_err[-2000:]
  assert runs[1].returncode == 0, two_err[-2000:]
  assert "over 4 cpu device(s) in 2 process(es)" in two_out
  records = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl")
                    .read_text().splitlines()] for name in ("one", "two")}
  losses = {name: [r["loss"] for r in rs if "loss" in r] for name, rs in records.items()}
  assert len(losses["one"]) == 3 and losses["two"] == losses["one"]  # bit for bit


@pytest.mark.parametrize("target", ["", "local", "tpu", "xpk", "slurm"])
def test_help_of_every_target(capsys, target):
  with pytest.raises(SystemExit) as exit_:
    cli.main(["launch", *target.split(), "--help"])
  assert exit_.value.code == 0
  assert capsys.readouterr().out.startswith(f"usage: jaxllm launch {target}".strip())


# Tiny children of `launch.local`, standing in for a job's processes (JAXLLM_PROCESS_ID says
# which one each is). Process 0 waits for process 1 as a collective would.
CHATTY = """
import os, pathlib, sys, time
done = pathlib.Path(sys.argv[1])
if os.environ["JAXLLM_PROCESS_ID"] == "1":
  sys.stdout.write("x" * 2**20)  # 1 MB, 16 times what a pipe holds
  sys.stdout.flush()
  done.touch()
while not done.exists():
  time.sleep(0.05)
"""
FAILING = """
import os, signal, sys, time
if os.environ["JAXLLM_PROCESS_ID"] == "1":
  print("process 1: bad config")
  sys.exit(3)
if len(sys.argv) > 1:  # a process that ignores SIGTERM, as one stuck in a collective can
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
time.sleep(600)
"""


def _timed_local(*arguments, **options):
  start = time.monotonic()
  status = launch.local([sys.executable, "-c", *arguments], 2, **options)
  return status, time.monotonic() - start


def test_local_drains_a_chatty_process(tmp_path):
  status, seconds = _timed_local(CHATTY, str(tmp_path / "done"))
  assert status == 0 and seconds < 15  # about 0.5 s; a pipe read only at the end deadlocks


def test_local_failing_process_stops_the_others(capsys):
  status, seconds = _timed_local(FAILING)
  assert status == 3 and seconds < 15  # about 0.5 s; the sleeper used to run for 600 s
  err = capsys.readouterr().err
  assert "jaxllm launch: process 1 exited 3; stopping the other processes" in err
  assert "process 1: bad config" in err


def test_local_kills_a_process_deaf_to_sigterm():
  status, seconds = _timed_local(FAILING, "ignore SIGTERM", grace_seconds=1)
  assert status == 3 and 1 <= seconds < 15  # the grace second, then SIGKILL


def test_tpu_restarts_only_when_preempted_or_lost():
  assert [launch.should_restart(status, state) for status, state in [
      (0, "READY"), (2, "READY"), (1, "READY"), (255, "READY"),  # a failure would fail again
      (75, "READY"), (255, "PREEMPTED"), (1, "TERMINATED"), (255, "")]] == [
          False, False, False, False, True, True, True, True]


def _fake_tpu(tmp_path, run_statuses, state="READY"):
  """Stand-ins for the gcloud commands that log their names; `run` exits with the next of
  `run_statuses`, `describe` prints the slice's state."""
  log, attempts = tmp_path / "log", tmp_path / "attempts"

  def step(name, script=""):
    return ["sh", "-c", f"echo {name} >> {log}; {script}"]

  run = (f"echo x >> {attempts}; n=$(wc -l < {attempts}); "
         f"exit $(echo {' '.join(map(str, run_statuses))} | cut -d' ' -f$n)")
  return log, {"create": step("create"), "install": step("install"), "run": step("run", run),
               "describe": ["echo", state], "delete": step("delete")}


def test_tpu_config_error_is_not_retried_and_deletes_once(tmp_path, capsys):
  log, commands = _fake_tpu(tmp_path, [2])
  assert launch.run_tpu(commands, max_restarts=3, dry_run=False) == 2
  assert log.read_text().split() == ["create", "install", "run", "delete"]


def test_tpu_preempted_run_goes_again(tmp_path, capsys):
  log, commands = _fake_tpu(tmp_path, [75, 0])
  assert launch.run_tpu(commands, max_restarts=3, dry_run=False) == 0
  assert log.read_text().split() == ["create", "install", "run", "delete",
                                     "create", "install", "run", "delete"]


def test_tpu_lost_slice_until_restarts_run_out(tmp_path, capsys):
  log, commands = _fake_tpu(tmp_path, [255, 255], state="PREEMPTED")
  assert launch.run_tpu(commands, max_restarts=1, dry_run=False) == 255
  assert log.read_text().split() == ["create", "install", "run", "delete",
                                     "create", "install", "run", "delete"]


SRUN_STEP = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8", "SLURM_NODELIST": "gpu[01-02]",
             "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_PROCID": "5",
             "SLURM_LOCALID": "1"}
# What slurmstepd gives an sbatch script (the batch step has no SLURM_STEP_* variables) and
# salloc its shell: the allocation's task count, no step.
SBATCH_SHELL = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8", "SLURM_NODELIST": "gpu[01-02]",
                "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
SALLOC_SHELL = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8", "SLURM_NODELIST": "gpu[01-02]"}


@pytest.mark.parametrize("environment, detected", [
    (SRUN_STEP, True), ({**SRUN_STEP, "SLURM_NTASKS": "1"}, False), (SBATCH_SHELL, False),
    (SALLOC_SHELL, False), ({}, False)])
def test_slurm_step_detection(environment, detected):
  from jax._src.clusters import slurm_cluster  # what jax.distributed.initialize() would use

  from jaxllm.training import multihost

  assert multihost.cluster_detected(environment) == detected
  if detected:  # then JAX finds its process count and id there
    with mock.patch.dict(os.environ, environment, clear=True):
      assert slurm_cluster.SlurmCluster.is_env_present()


def test_tpu_failed_create_ends_the_job(tmp_path, capsys):
  log, commands = _fake_tpu(tmp_path, [0])
  commands["create"] = ["sh", "-c", f"echo create >> {log}; exit 1"]  # e.g. a wrong zone
  assert launch.run_tpu(commands, max_restarts=3, dry_run=False) == 1
  assert log.read_text().split() == ["create", "delete"]


# A job's process that saves and exits 75 on SIGTERM, as jaxllm train does.
SAVING = """
import os, pathlib, signal, sys, time
here = pathlib.Path(sys.argv[1]) / os.environ["JAXLLM_PROCESS_ID"]
def save_and_stop(signum, frame):
  here.with_suffix(".saved").touch()
  sys.exit(75)
signal.signal(signal.SIGTERM, save_and_stop)
here.with_suffix(".ready").touch()
time.sleep(600)
"""
LAUNCHER = """
import sys
from jaxllm.tools import launch
sys.exit(launch.local([sys.executable, "-c", sys.argv[1], sys.argv[2]], 2))
"""


def test_local_passes_sigterm_on_to_every_process(tmp_path):
  launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, SAVING, str(tmp_path)],
                              cwd=REPO, stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 60
  while len(list(tmp_path.glob("*.ready"))) < 2 and time.monotonic() < deadline:
    time.sleep(0.05)
  launcher.send_signal(signal.SIGTERM)
  _, err = launcher.communicate(timeout=60)
  # Before, the launcher died at once (-15) and its processes ran on, unsaved.
  assert launcher.returncode == 75, err
  assert sorted(p.name for p in tmp_path.glob("*.saved")) == ["0.saved", "1.saved"]
  assert "jaxllm launch: SIGTERM; passing it on to every process" in err


def test_jaxllm_help_lists_every_command(capsys):
  with pytest.raises(SystemExit) as exit_:
    cli.main(["--help"])
  assert exit_.value.code == 0
  commands = ("train", "generate", "finetune", "eval", "convert", "reproduce", "sweep", "launch")
  listed = capsys.readouterr().out.splitlines()
  for command in commands:
    assert any(line.split()[:1] == [command] for line in listed), command
