"""Run outputs: metrics as JSON lines and TensorBoard events, the loss-curve PNG, and the
FLOP/s peak behind MFU."""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp

from jaxllm.errors import JaxllmError


class MetricsWriter:
  """Appends one JSON object per logged step to metrics.jsonl, keeps them for the plot, and,
  given `tensorboard_dir`, writes their numbers as TensorBoard scalars there.

  Scalars are grouped as TensorBoard shows them: evaluation figures (`train_loss`,
  `val_accuracy`, ...) under "eval/", the rest (loss, lr, grad_norm, tokens_per_s, mfu, ...)
  under "train/". `purge_step` (a resumed run's first step) hides what an earlier, killed
  process logged from that step on.
  """

  def __init__(self, path: pathlib.Path, tensorboard_dir: pathlib.Path | None = None,
               purge_step: int | None = None):
    self.path = pathlib.Path(path)
    self.records: list[dict[str, Any]] = []
    self._file = open(self.path, "a")
    self._events = None
    if tensorboard_dir is not None:
      SummaryWriter = _summary_writer_class()
      # Event files are named by the second they start in: a resumed run restarted within
      # the same second would overwrite its predecessor's without a suffix of its own.
      self._events = SummaryWriter(str(tensorboard_dir), purge_step=purge_step,
                                   filename_suffix=f".{purge_step or 0}.{os.getpid()}")

  def write(self, record: dict[str, Any], events: bool = True) -> None:
    """Adds a record; `events=False` keeps it out of TensorBoard (history already there)."""
    record = {k: (float(v) if hasattr(v, "dtype") else v) for k, v in record.items()}
    self.records.append(record)
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._events is not None and events:
      for name, value in record.items():
        if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
          group = "eval" if name.startswith(("train_", "val_", "test_")) else "train"
          self._events.add_scalar(f"{group}/{name}", value, record["step"])
      self._events.flush()

  def close(self) -> None:
    self._file.close()
    if self._events is not None:
      self._events.close()


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported without PyTorch: tensorboardX imports torch when it
  is installed (the `hf` extra brings it) only to accept torch tensors, which jaxllm never
  passes, and that import took 1.4 of a Shakespeare run's 5 s of start-up."""
  blocked = "torch" not in sys.modules
  if blocked:
    sys.modules["torch"] = None  # `import torch` raises ImportError while this is set
  try:
    from tensorboardX import SummaryWriter
  finally:
    if blocked:
      del sys.modules["torch"]
  return SummaryWriter


def read_metrics(path: pathlib.Path) -> list[dict[str, Any]]:
  """Every record of a metrics.jsonl, the one reader of these files.

  A last line without its newline that is not JSON is a write cut short by a kill (the case
  resumes and sweeps are built for) and is left out; any other line that is not a record is
  an error naming the file and the line.
  """
  path = pathlib.Path(path)
  lines = path.read_text().split("\n")  # a whole file ends in "\n": the last item is ""
  records = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      if number == len(lines):
        break
      raise JaxllmError(f"{path}, line {number}: not a JSON record ({e.msg}); delete that line "
                        f"(or the file, losing the run's logged history)") from None
    if not isinstance(record, dict) or "step" not in record:
      raise JaxllmError(f"{path}, line {number}: not a JSON record (an object with a step); "
                        f"delete that line (or the file, losing the run's logged history)")
    records.append(record)
  return records


def read_records(path: pathlib.Path, until_step: int) -> list[dict[str, Any]]:
  """The records of metrics.jsonl up to `until_step`: a resumed run's history (a killed run may
  have logged past its last checkpoint; those steps are run again)."""
  path = pathlib.Path(path)
  if not path.exists():
    return []
  return [r for r in read_metrics(path) if r["step"] <= until_step]


def replace_records(path: pathlib.Path, records: list[dict[str, Any]]) -> None:
  """Makes metrics.jsonl hold just `records` (a resumed run's history up to its checkpoint).

  They are written to a file beside it that is then renamed over it (`os.replace`, atomic on
  POSIX and Windows): a kill at any moment leaves the old history or the new one, never none.
  """
  path = pathlib.Path(path)
  temporary = path.with_name(path.name + ".tmp")
  try:
    with open(temporary, "w") as f:
      for record in records:
        f.write(json.dumps(record) + "\n")
      f.flush()
      os.fsync(f.fileno())  # the bytes on disk before the name points at them
  except BaseException:
    temporary.unlink(missing_ok=True)
    raise
  os.replace(temporary, path)


def plot_losses(records: list[dict[str, Any]], path: pathlib.Path, title: str = "") -> None:
  """Training loss per logged step, and evaluated train/validation losses, against steps."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.5))
  series = [("loss", "train (batch)", "-", 1.0),
            ("train_loss", "train (eval)", "o-", 1.0),
            ("val_loss", "validation", "o-", 1.0)]
  for key, label, style, alpha in series:
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    if points:
      steps, values = zip(*points)
      ax.plot(steps, values, style, label=label, alpha=alpha, markersize=3)
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy loss (nats/token)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def measure_peak_flops(dtype: str = "float32", size: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of the best of `repeats` jitted size³ matmuls on the default device.

  For bfloat16 the operands are bfloat16 and the product float32, as the model computes.
  """
  operand = jnp.dtype(dtype)
  a = jnp.ones((size, size), operand)
  b = jnp.ones((size, size), operand)
  product = jnp.promote_types(operand, jnp.float32)
  matmul = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=product))
  matmul(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size**3 / best
