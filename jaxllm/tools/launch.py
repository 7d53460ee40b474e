"""`jaxllm launch`: one jaxllm command on several processes or hosts, with the platforms' tools.

    jaxllm launch local --processes 2 [--devices-per-process 2] -- train --config ...
    jaxllm launch tpu --name NAME --zone ZONE --accelerator v5litepod-16 [--spot] -- train ...
    jaxllm launch xpk --cluster CLUSTER --workload NAME --tpu-type v5litepod-16 -- train ...
    jaxllm launch slurm --nodes 2 --gpus-per-node 8 -- train ...

Every host runs the same jaxllm command (what follows `--`); jaxllm joins the processes with
`jax.distributed.initialize` (jaxllm/training/multihost.py). `local` really runs N processes here,
joined on 127.0.0.1 (gloo on CPU); the first to fail stops the others. The others print their
commands with `--dry-run` and otherwise run them: `gcloud compute tpus tpu-vm` (create,
install on `--worker=all`, run on `--worker=all`, and on a preempted run or a lost slice
delete, create and run again, resuming from the checkpoints; delete at the end), `xpk workload
create` (JobSet restarts a workload on exit codes 42 and 127-255, not on jaxllm's 75
"preempted, try again", so 75 becomes 42), and `sbatch` (a `--requeue` job that requeues
itself when jaxllm exits 75).
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Sequence

from jaxllm.errors import PREEMPTED_EXIT_STATUS, JaxllmError
from jaxllm.tools import tpu

XPK_RESTART_STATUS = 42  # what JobSet's restart policy treats as "restart me"
STOP_GRACE_SECONDS = 10.0  # for the other local processes to save before they are killed
OUTPUT_TAIL_BYTES = 4000  # of a failed local process's output, shown


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def local(command: Sequence[str], processes: int, devices_per_process: int = 0,
          port: int = 0, grace_seconds: float = STOP_GRACE_SECONDS) -> int:
  """Runs `command` as `processes` processes of one job on this machine, joined on
  127.0.0.1. Process 0's output is shown as it comes (it speaks for the job); another's is
  read all along and its end shown if it fails. The first process to fail stops the others
  (its peers would wait for it in their next collective) and its status is the job's."""
  if processes < 1:
    raise JaxllmError(f"--processes must be at least 1, got {processes}")
  env = dict(os.environ, JAXLLM_COORDINATOR=f"127.0.0.1:{port or _free_port()}",
             JAXLLM_NUM_PROCESSES=str(processes))
  if devices_per_process:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count="
                        f"{devices_per_process}").strip()
  children, outputs, terminated = [], {}, False
  # SIGTERM (a scheduler's "stop now") goes on to every process, which saves and exits 75.
  in_main_thread = threading.current_thread() is threading.main_thread()  # where signals go
  previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
  try:
    for index in range(processes):
      quiet = index > 0  # process 0 writes to the terminal
      children.append(subprocess.Popen(
          command, env={**env, "JAXLLM_PROCESS_ID": str(index)},
          stdout=subprocess.PIPE if quiet else None, stderr=subprocess.STDOUT if quiet else None))
      if quiet:
        outputs[index] = _Output(children[-1].stdout)
    failed = _first_failure(children)
    if failed is not None:
      print(f"jaxllm launch: process {failed} exited "
            f"{_shell_status(children[failed].returncode)}; stopping the other processes",
            file=sys.stderr)
  except KeyboardInterrupt:  # Ctrl-C reached every process too; _stop collects them
    print("jaxllm launch: interrupted", file=sys.stderr)
    return 130
  except _Terminated:
    print("jaxllm launch: SIGTERM; passing it on to every process", file=sys.stderr)
    terminated = True
  finally:
    if in_main_thread:  # a second SIGTERM must not cut _stop short
      signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _stop(children, grace_seconds)
    if in_main_thread:
      signal.signal(signal.SIGTERM, previous)
  if terminated:  # 75 if every process saved and stopped as asked, else the first other status
    statuses = [_shell_status(child.returncode) for child in children]
    return next((status for status in statuses if status != PREEMPTED_EXIT_STATUS),
                PREEMPTED_EXIT_STATUS)
  for output in outputs.values():
    output.thread.join(timeout=1)  # a grandchild may hold a pipe open; its output can go
  if failed is None:
    return 0
  if failed > 0:  # process 0's output was shown already
    print(f"jaxllm launch: its last output:\n{outputs[failed].tail.decode(errors='replace')}",
          file=sys.stderr)
  return _shell_status(children[failed].returncode)


class _Terminated(Exception):
  """SIGTERM reached the launcher."""


def _raise_terminated(signum, frame) -> None:
  raise _Terminated


class _Output:
  """A process's output read to the end as it comes, the last bytes kept: a pipe nobody
  reads fills up (64 KB), and the process blocks in its next print."""

  def __init__(self, stream):
    self.tail = b""
    self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
    self.thread.start()

  def _read(self, stream) -> None:
    for chunk in iter(lambda: stream.read1(1 << 16), b""):
      self.tail = (self.tail + chunk)[-OUTPUT_TAIL_BYTES:]


def _first_failure(children: Sequence[subprocess.Popen]) -> int | None:
  """Waits until every process has exited 0 (None) or one has failed (its index)."""
  while True:
    statuses = [child.poll() for child in children]
    failed = [index for index, status in enumerate(statuses) if status not in (None, 0)]
    if failed:
      return failed[0]
    if None not in statuses:
      return None
    time.sleep(0.05)


def _stop(children: Sequence[subprocess.Popen], grace_seconds: float) -> None:
  """SIGTERM to the processes still running (jaxllm saves and exits 75 if it can), SIGKILL
  to those still running `grace_seconds` later (one waiting on a dead peer never exits)."""
  running = [child for child in children if child.poll() is None]
  for child in running:
    child.terminate()
  deadline = time.monotonic() + grace_seconds
  for child in running:
    try:
      child.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      child.kill()
      child.wait()


def _shell_status(returncode: int) -> int:
  """A process's status as a shell reports it: 128 + N for one killed by signal N."""
  return 128 - returncode if returncode < 0 else returncode


def worker_command(argv: Sequence[str], checkout: str = "jaxllm") -> str:
  """What each host runs: the jaxllm command in the checkout's venv, JAX finding the peers."""
  return f"cd {checkout} && JAXLLM_DISTRIBUTED=auto .venv/bin/jaxllm {shlex.join(argv)}"


def tpu_hosts(accelerator: str) -> int:
  """Hosts of a TPU VM slice (jaxllm/tools/tpu.py: v5e / v6e slices past 8 chips have 4 chips a
  host; v4 / v5p count cores in their names, v4-32: 16 chips, 4 a host)."""
  return tpu.tpu_type(accelerator).hosts


def tpu_commands(argv: Sequence[str], *, name: str, zone: str, accelerator: str,
                 version: str, repository: str, project: str = "",
                 spot: bool = False) -> dict[str, list[str]]:
  """The gcloud commands of a TPU VM job: create, install, run, describe (the slice's state),
  delete."""
  base = ["gcloud", "compute", "tpus", "tpu-vm"]
  where = [f"--zone={zone}"] + ([f"--project={project}"] if project else [])
  install = (f"git clone {repository} jaxllm && cd jaxllm && python3 -m venv .venv && "
             f".venv/bin/pip install -e . 'jax[tpu]'")
  return {
      "create": [*base, "create", name, *where, f"--accelerator-type={accelerator}",
                 f"--version={version}", *(["--spot"] if spot else [])],
      "install": [*base, "ssh", name, *where, "--worker=all", f"--command={install}"],
      "run": [*base, "ssh", name, *where, "--worker=all",
              f"--command={worker_command(argv)}"],
      "describe": [*base, "describe", name, *where, "--format=value(state)"],
      "delete": [*base, "delete", name, *where, "--quiet"],
  }


def should_restart(status: int, slice_state: str) -> bool:
  """Whether an attempt that ended with `status` on a slice in `slice_state` (gcloud's: READY,
  PREEMPTED, ...; "" for a slice that is gone) is worth a new slice: a preempted run (75) or a
  lost slice resumes from its checkpoints; any other failure (2, a config error) would fail
  again."""
  return status != 0 and (status == PREEMPTED_EXIT_STATUS or slice_state != "READY")


def _slice_state(commands: dict[str, list[str]]) -> str:
  described = subprocess.run(commands["describe"], capture_output=True, text=True)
  return described.stdout.strip() if described.returncode == 0 else ""


def _install_and_run(commands: dict[str, list[str]]) -> int:
  """The first non-zero status of install and run, else 0."""
  for step in ("install", "run"):
    status = subprocess.run(commands[step]).returncode
    if status:
      return status
  return 0


def run_tpu(commands: dict[str, list[str]], max_restarts: int, dry_run: bool) -> int:
  """create, install, run; on a preempted run (75) or a lost slice, delete and go again; the
  slice is deleted once at the end, whatever happened."""
  if dry_run:
    for step in ("create", "install", "run"):
      print(shlex.join(commands[step]))
    print(f"# exit 75 (preempted) or a lost slice (a state other than READY from "
          f"{shlex.join(commands['describe'])}): {shlex.join(commands['delete'])}, then "
          f"create, install and run again (resuming from checkpoints), up to "
          f"{max_restarts} times; any other failure ends the job")
    print(shlex.join(commands["delete"]))
    return 0
  status = 0
  for attempt in range(max_restarts + 1):
    if attempt:
      print(f"jaxllm launch: attempt {attempt} ended with status {status}; recreating the "
            f"slice", file=sys.stderr)
      subprocess.run(commands["delete"])
    status = subprocess.run(commands["create"]).returncode
    if status:  # no slice was made (a wrong zone, no capacity): none to run on, none lost
      break
    status = _install_and_run(commands)
    if not should_restart(status, _slice_state(commands)):
      break
  subprocess.run(commands["delete"])
  return status


def xpk_command(argv: Sequence[str], *, cluster: str, workload: str, tpu_type: str,
                num_slices: int, max_restarts: int, docker_image: str) -> list[str]:
  """`xpk workload create`, the preempted status mapped onto JobSet's restart code."""
  run = (f"JAXLLM_DISTRIBUTED=auto jaxllm {shlex.join(argv)}; status=$?; "
         f"if [ $status -eq {PREEMPTED_EXIT_STATUS} ]; then exit {XPK_RESTART_STATUS}; fi; "
         f"exit $status")
  return ["xpk", "workload", "create", f"--cluster={cluster}", f"--workload={workload}",
          f"--tpu-type={tpu_type}", f"--num-slices={num_slices}",
          f"--max-restarts={max_restarts}", f"--docker-image={docker_image}",
          f"--command=bash -c {shlex.quote(run)}"]


def slurm_script(argv: Sequence[str], *, nodes: int, gpus_per_node: int, job_name: str,
                 time_limit: str = "", partition: str = "") -> str:
  """An sbatch script: one process per GPU (JAX reads SLURM's layout), requeued when
  jaxllm exits 75; SIGTERM two minutes before the time limit lets it save first."""
  lines = ["#!/bin/bash", f"#SBATCH --job-name={job_name}", f"#SBATCH --nodes={nodes}",
           f"#SBATCH --ntasks-per-node={gpus_per_node}", f"#SBATCH --gpus-per-node={gpus_per_node}",
           "#SBATCH --requeue", "#SBATCH --signal=TERM@120"]
  lines += [f"#SBATCH --time={time_limit}"] * bool(time_limit)
  lines += [f"#SBATCH --partition={partition}"] * bool(partition)
  requeue = 'scontrol requeue "$SLURM_JOB_ID"'
  lines += ["", f"srun .venv/bin/jaxllm {shlex.join(argv)}", "status=$?",
            f"if [ $status -eq {PREEMPTED_EXIT_STATUS} ]; then {requeue}; fi", "exit $status", ""]
  return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
  after = "then -- and the jaxllm command every process runs, e.g. -- train --config FILE"
  parser = argparse.ArgumentParser(prog="jaxllm launch", epilog=after)
  targets = parser.add_subparsers(dest="target", required=True)
  local_ = targets.add_parser("local", help="N processes of one job on this machine",
                              epilog=after)
  local_.add_argument("--processes", type=int, required=True)
  local_.add_argument("--devices-per-process", type=int, default=0,
                      help="simulated CPU devices per process (0: the real ones)")
  tpu = targets.add_parser("tpu", help="a Cloud TPU VM slice through gcloud", epilog=after)
  tpu.add_argument("--name", required=True)
  tpu.add_argument("--zone", required=True)
  tpu.add_argument("--accelerator", required=True, help="e.g. v5litepod-16")
  tpu.add_argument("--version", default="v2-alpha-tpuv5-lite", help="the TPU VM runtime")
  tpu.add_argument("--project", default="")
  tpu.add_argument("--repository", required=True,
                   help="the jaxllm git repository each worker clones")
  tpu.add_argument("--spot", action="store_true")
  tpu.add_argument("--max-restarts", type=int, default=3)
  tpu.add_argument("--dry-run", action="store_true")
  xpk = targets.add_parser("xpk", help="a GKE workload through xpk", epilog=after)
  xpk.add_argument("--cluster", required=True)
  xpk.add_argument("--workload", required=True)
  xpk.add_argument("--tpu-type", required=True)
  xpk.add_argument("--num-slices", type=int, default=1)
  xpk.add_argument("--max-restarts", type=int, default=3)
  xpk.add_argument("--docker-image", required=True, help="an image with jaxllm installed")
  xpk.add_argument("--dry-run", action="store_true")
  slurm = targets.add_parser("slurm", help="a SLURM job through sbatch", epilog=after)
  slurm.add_argument("--nodes", type=int, required=True)
  slurm.add_argument("--gpus-per-node", type=int, required=True)
  slurm.add_argument("--job-name", default="jaxllm")
  slurm.add_argument("--time", default="")
  slurm.add_argument("--partition", default="")
  slurm.add_argument("--script", default="jaxllm.sbatch", help="where the script is written")
  slurm.add_argument("--dry-run", action="store_true")
  return parser


def main(argv: Sequence[str]) -> int:
  """`jaxllm launch TARGET [options] -- JAXLLM ARGS`."""
  argv = list(argv)
  split = argv.index("--") if "--" in argv else len(argv)
  parser = _parser()
  args, unknown = parser.parse_known_args(argv[:split])  # --help: the usage, exit 0
  command = argv[split + 1:]
  if not command:
    raise JaxllmError("jaxllm launch needs the command to run after --, e.g. "
                      "jaxllm launch local --processes 2 -- train --config experiments/<name>.py")
  if unknown:
    parser.error(f"unrecognized arguments: {shlex.join(unknown)}")
  if args.target == "local":
    return local([sys.executable, "-m", "jaxllm.cli", *command], args.processes,
                 args.devices_per_process)
  if args.target == "tpu":
    commands = tpu_commands(command, name=args.name, zone=args.zone,
                            accelerator=args.accelerator, version=args.version,
                            repository=args.repository, project=args.project, spot=args.spot)
    print(f"# {args.accelerator}: {tpu_hosts(args.accelerator)} host(s), each running the "
          f"same command; JAX numbers the processes from the slice's metadata")
    return run_tpu(commands, args.max_restarts, args.dry_run)
  if args.target == "xpk":
    line = xpk_command(command, cluster=args.cluster, workload=args.workload,
                       tpu_type=args.tpu_type, num_slices=args.num_slices,
                       max_restarts=args.max_restarts, docker_image=args.docker_image)
    print(shlex.join(line))
    return 0 if args.dry_run else subprocess.run(line).returncode
  script = slurm_script(command, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                        job_name=args.job_name, time_limit=args.time, partition=args.partition)
  print(f"# {args.nodes} node(s) x {args.gpus_per_node} GPU(s): "
        f"{args.nodes * args.gpus_per_node} processes, ids from SLURM_PROCID\n{script}"
        f"sbatch {args.script}")
  if args.dry_run:
    return 0
  with open(args.script, "w") as f:
    f.write(script)
  return subprocess.run(["sbatch", args.script]).returncode
