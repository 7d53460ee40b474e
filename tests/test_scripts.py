"""The README's two commands: what `scripts/quickstart.sh` and `.ci/run` install and run.

They run here against a stand-in .venv whose python and jaxllm only record their arguments,
so the test sees every install and command without installing anything.
"""

import os
import pathlib
import shutil
import subprocess

REPO = pathlib.Path(__file__).resolve().parents[1]

RECORDER = """#!/usr/bin/env bash
echo "$(basename "$0") $*" >> "$(dirname "$0")/../calls.log"
"""


def _run(tmp_path, script):
  for folder in ("scripts", ".ci"):
    shutil.copytree(REPO / folder, tmp_path / folder)
  bin_dir = tmp_path / ".venv" / "bin"
  bin_dir.mkdir(parents=True)
  for name in ("python", "jaxllm"):
    (bin_dir / name).write_text(RECORDER)
    (bin_dir / name).chmod(0o755)
  env = {**os.environ, "JAXLLM_SHARED": str(tmp_path / "no-mirror")}
  env.pop("JAXLLM_EXTRAS", None)
  subprocess.run(["bash", script], cwd=tmp_path, env=env, check=True, timeout=60)
  return (tmp_path / ".venv" / "calls.log").read_text().splitlines()


def test_quickstart_installs_jaxllm_alone_then_trains(tmp_path):
  calls = _run(tmp_path, "scripts/quickstart.sh")
  installs = [c for c in calls if "pip install" in c and "-e" in c]
  assert installs == ["python -m pip install --quiet -c constraints.txt -e ."]
  assert calls[-1].startswith("jaxllm train --config experiments/shakespeare_char.py")


def test_ci_installs_the_test_extras_then_runs_pytest(tmp_path):
  calls = _run(tmp_path, ".ci/run")
  installs = [c for c in calls if "pip install" in c and "-e" in c]
  assert installs == ["python -m pip install --quiet -c constraints.txt "
                      "-e .[test,hf,eval,tpu-preflight]"]
  assert calls[-1] == "python -m pytest -q --durations=30"  # the slowest tests, printed
