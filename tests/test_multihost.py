"""Two processes joined on 127.0.0.1 (gloo): what process 0 prepares, the others wait for, and
a failure on process 0 stops them at once."""

import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

# Process 0 writes the file the others read (as the token cache), or fails as a bad corpus does.
CHILD = """
import pathlib, sys
from jaxllm.training import multihost
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


def _two_processes(tmp_path, mode: str, child: str = CHILD,
                   path: str = "") -> tuple[list[int], list[str], float]:
  coordinator = f"127.0.0.1:{_free_port()}"
  procs = []
  start = time.monotonic()
  for i in range(2):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO),
           "JAXLLM_COORDINATOR": coordinator, "JAXLLM_NUM_PROCESSES": "2",
           "JAXLLM_PROCESS_ID": str(i)}
    procs.append(subprocess.Popen([sys.executable, "-c", child, path or str(tmp_path / "cache"), mode],
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


# Two processes save steps 1 and 2 of one state (split over both processes' devices);
# then process 1 alone finds step 2 unreadable, as when its share of the files is damaged or
# missing. Each process prints the step it restored.
RESTORE_CHILD = """
import pathlib, sys
import jax, numpy as np
from jaxllm import config as config_lib
from jaxllm.training import checkpoint
from jaxllm.training import multihost
from jaxllm.training import step as train
from jaxllm.models.gpt import GPT, init_params
multihost.initialize()
directory, damage = pathlib.Path(sys.argv[1]), sys.argv[2]
config = config_lib.default_config()
config.model.preset = "gpt-micro"
model = GPT(config_lib.model_config(config.model, vocab_size=40))
optimizer = train.make_optimizer(config.train, 100)
create = lambda: train.create_train_state(init_params(model, jax.random.key(0)), optimizer, seed=1)
mesh = jax.sharding.Mesh(np.array(jax.devices()), ("fsdp",))
# Split over the two processes where the first axis allows (as FSDP splits), else replicated.
split = lambda x: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
    *(("fsdp",) if x.ndim and x.shape[0] % 2 == 0 else ())))
shardings = jax.tree.map(split, jax.eval_shape(create))
state = jax.jit(create, out_shardings=shardings)()
manager = checkpoint.make_manager(directory, config.checkpoint)
for step in (1, 2):
  state = state.replace(step=state.step + 1)
  checkpoint.save(manager, step, state, config, {}, force=True)
manager.wait_until_finished()
manager = checkpoint.make_manager(directory, config.checkpoint)
if jax.process_index() == 1:
  def fail_on_step_2(method):
    def wrapped(step, *args, **kwargs):
      if step == 2:
        raise OSError(f"{directory}/2: a file of this process's share is missing")
      return method(step, *args, **kwargs)
    return wrapped
  if damage == "metadata":
    manager.item_metadata = fail_on_step_2(manager.item_metadata)
  else:  # the read of the arrays
    read = checkpoint._read_alone
    checkpoint._read_alone = lambda where, items: fail_on_step_2(
        lambda step: read(where, items))(int(where.name))
restored, data_step = checkpoint.restore(manager, checkpoint.abstract_state(create, shardings))
print("restored:", data_step, int(restored.step), flush=True)
multihost.sync("done")
"""


@pytest.mark.parametrize("damage", ["metadata", "arrays"])
def test_processes_agree_on_the_checkpoint_step_to_restore(tmp_path, damage):
  """When one process alone cannot read the latest step, every process restores the one
  before it (each deciding alone, process 0 restored step 2 and process 1 step 1)."""
  codes, outputs, _ = _two_processes(tmp_path, damage, RESTORE_CHILD,
                                     str(tmp_path / "checkpoints"))
  assert codes == [0, 0], outputs
  for out in outputs:
    assert "restored: 1 1" in out, out
  assert f"jaxllm: warning: skipping checkpoint {tmp_path / 'checkpoints' / '2'}" in outputs[0]
  if damage == "arrays":  # set aside (by process 0) so the resumed run saves step 2 again
    assert (tmp_path / "checkpoints" / "damaged-2").is_dir()
