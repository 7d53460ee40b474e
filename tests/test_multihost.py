"""Two processes joined on 127.0.0.1 (gloo): what process 0 prepares, the others wait for, and
a failure on process 0 stops them at once."""

import os
import pathlib
import socket
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]

# Process 0 writes the file the others read (as the token cache), or fails as a bad corpus does.
CHILD = """
import pathlib, sys
from jaxllm import multihost
from jaxllm.errors import JaxllmError
multihost.initialize()
shared, fail = pathlib.Path(sys.argv[1]), sys.argv[2] == "fail"

def prepare():
  if multihost.is_main():
    if fail:
      raise JaxllmError(f"{shared} holds no text (an empty corpus)")
    shared.write_text("prepared by process 0")
  return shared.read_text()

try:
  print("read:", multihost.main_first(prepare))
  # As a checkpoint one process alone cannot read: neither restores it.
  print("everywhere:", multihost.everywhere(True), multihost.everywhere(multihost.is_main()))
except JaxllmError as e:
  print("error:", e)
  sys.exit(2)
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_processes(tmp_path, mode: str) -> tuple[list[int], list[str], float]:
  coordinator = f"127.0.0.1:{_free_port()}"
  procs = []
  start = time.monotonic()
  for i in range(2):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO),
           "JAXLLM_COORDINATOR": coordinator, "JAXLLM_NUM_PROCESSES": "2",
           "JAXLLM_PROCESS_ID": str(i)}
    procs.append(subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "cache"), mode],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True))
  outputs = [p.communicate(timeout=120)[0] for p in procs]
  return [p.returncode for p in procs], outputs, time.monotonic() - start


def test_the_others_read_what_process_0_prepared_and_all_agree(tmp_path):
  codes, outputs, _ = _two_processes(tmp_path, "ok")
  assert codes == [0, 0], outputs
  for out in outputs:
    assert "read: prepared by process 0" in out, out
    assert "everywhere: True False" in out, out


def test_a_failure_on_process_0_stops_the_others_with_its_message(tmp_path):
  codes, outputs, seconds = _two_processes(tmp_path, "fail")
  assert codes == [2, 2], outputs
  assert f"error: {tmp_path / 'cache'} holds no text (an empty corpus)" in outputs[0]
  assert ("error: process 0 failed, so this process stops too: "
          f"{tmp_path / 'cache'} holds no text (an empty corpus)") in outputs[1]
  # Without the shared outcome process 1 waited at the barrier for the coordination
  # service's timeout (minutes); now it ends with process 0 (start-up included).
  assert seconds < 60, seconds
