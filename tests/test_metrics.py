"""Run metrics: metrics.jsonl and the TensorBoard event files beside it, read back by
TensorBoard's own reader (TensorFlow's summary_iterator)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from jaxllm.errors import JaxllmError
from jaxllm.training import metrics


def read_events(directory):
  """{tag: {step: value}} of every event file in `directory`, honouring purges as
  TensorBoard does (a SessionLog START at step s drops earlier files' events from s on)."""
  import tensorflow as tf

  scalars: dict = {}
  for path in sorted(directory.iterdir()):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      if event.HasField("session_log") and event.session_log.status == event.session_log.START:
        for steps in scalars.values():
          for step in [s for s in steps if s >= event.step]:
            del steps[step]
      for value in event.summary.value:
        scalars.setdefault(value.tag, {})[event.step] = value.simple_value
  return scalars


def test_scalars_read_back_by_tensorboard(tmp_path):
  writer = metrics.MetricsWriter(tmp_path / "metrics.jsonl", tmp_path / "tb")
  writer.write({"step": 0, "train_loss": 4.2, "val_loss": 4.25})
  for step in (10, 20):
    writer.write({"step": step, "loss": 3.0 / step, "lr": 1e-3, "grad_norm": 0.5,
                  "tokens_per_s": 1234.5, "mfu": 0.01, "accuracy": 0.75, "flag": True})
  writer.write({"step": 20, "val_loss": 2.5, "val_accuracy": 0.8, "name": "x"})
  writer.close()
  scalars = read_events(tmp_path / "tb")
  assert scalars["train/loss"] == {10: pytest.approx(0.3), 20: pytest.approx(0.15)}
  assert scalars["eval/val_loss"] == {0: pytest.approx(4.25), 20: pytest.approx(2.5)}
  assert set(scalars) == {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s",
                          "train/mfu", "train/accuracy", "eval/train_loss", "eval/val_loss",
                          "eval/val_accuracy"}  # numbers only: no bools, no strings
  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in lines] == [0, 10, 20, 20]


def test_a_resumed_run_purges_what_the_killed_one_logged_past_its_checkpoint(tmp_path):
  first = metrics.MetricsWriter(tmp_path / "a.jsonl", tmp_path / "tb")
  for step in range(1, 7):  # killed after step 6; its checkpoint is at step 4
    first.write({"step": step, "loss": float(step)})
  first.close()
  resumed = metrics.MetricsWriter(tmp_path / "b.jsonl", tmp_path / "tb", purge_step=5)
  for step in range(1, 5):
    resumed.write({"step": step, "loss": float(step)}, events=False)  # history
  for step in range(5, 9):
    resumed.write({"step": step, "loss": 10.0 * step})
  resumed.close()
  losses = read_events(tmp_path / "tb")["train/loss"]
  assert sorted(losses) == list(range(1, 9))
  np.testing.assert_allclose([losses[s] for s in range(1, 9)],
                             [1, 2, 3, 4, 50, 60, 70, 80])


def test_event_files_without_importing_torch(tmp_path):
  """tensorboardX imports PyTorch whenever it is installed; jaxllm's writer keeps it out (1.4 s
  of start-up) and leaves `import torch` working afterwards."""
  code = ("import sys, pathlib; from jaxllm.training import metrics; "
          f"w = metrics.MetricsWriter(pathlib.Path({str(tmp_path / 'm.jsonl')!r}), "
          f"pathlib.Path({str(tmp_path / 'tb')!r})); w.write({{'step': 1, 'loss': 2.0}}); "
          "w.close(); print('torch' in sys.modules); import torch")
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert done.stdout.split() == ["False"]
  assert read_events(tmp_path / "tb")["train/loss"] == {1: 2.0}


def test_a_last_line_cut_by_a_kill_is_left_out(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.5}\n{"step": 3, "lo')
  assert [r["step"] for r in metrics.read_metrics(path)] == [1, 2]
  assert [r["step"] for r in metrics.read_records(path, until_step=10)] == [1, 2]


def test_a_corrupt_line_in_the_middle_names_the_file_and_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "lo\n{"step": 3, "loss": 2.0}\n')
  with pytest.raises(JaxllmError, match=r"metrics.jsonl, line 2: not a JSON record"):
    metrics.read_records(path, until_step=10)
  path.write_text('{"step": 1}\n[1, 2]\n')  # whole lines, but not records
  with pytest.raises(JaxllmError, match=r"metrics.jsonl, line 2: not a JSON record"):
    metrics.read_metrics(path)


def test_replacing_the_records_never_leaves_the_file_missing(tmp_path, monkeypatch):
  path = tmp_path / "metrics.jsonl"
  old = '{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.5}\n{"step": 3, "loss": 2.0}\n'
  path.write_text(old)
  dumps, seen = json.dumps, []

  def dumps_then_fail(record):  # every write sees the old file whole; the third one fails
    seen.append(path.read_text())
    if len(seen) == 3:
      raise OSError("No space left on device")
    return dumps(record)

  monkeypatch.setattr(metrics.json, "dumps", dumps_then_fail)
  with pytest.raises(OSError, match="No space left"):
    metrics.replace_records(path, [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5},
                                   {"step": 3, "loss": 1.0}])
  assert seen == [old] * 3
  assert path.read_text() == old
  assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
  monkeypatch.undo()
  metrics.replace_records(path, [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}])
  assert [r["step"] for r in metrics.read_metrics(path)] == [1, 2]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
