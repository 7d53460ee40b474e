"""The masked-LM task (jaxllm/tasks/mlm.py): where its masks are drawn, and its final report.
(Its loss, schedule, baseline by hand and exact resume are in tests/test_encoder.py.)"""

from __future__ import annotations

import jax
import numpy as np

from jaxllm import config as config_lib
from jaxllm import tasks
from jaxllm.data import token_files


def _task(shared_data, *overrides):
  config = config_lib.default_config()
  config_lib.apply_overrides(config, [
      "model.architecture=bert", "model.n_layer=1", "model.n_head=2", "model.d_model=32",
      "model.context_length=32", "data.dataset=text", "data.tokenizer=char",
      f"data.path={shared_data / 'the-verdict.txt'}", "train.task=mlm", "train.batch_size=8",
      "train.eval_batches=2", *overrides])
  return tasks.build(config)


def test_batches_are_made_on_the_host_without_touching_a_device(shared_data):
  # Masks are drawn in the jitted step: making a batch moves nothing to or from a device.
  task = _task(shared_data)
  with jax.transfer_guard("disallow"):
    batch = task.train_batch(5, None)
    evaluation = list(task.eval_batches("val"))
  assert all(isinstance(v, np.ndarray) for b in [batch, *evaluation] for v in b.values())
  assert len(evaluation) == 2


def test_masks_are_a_function_of_seed_step_and_row_only(shared_data):
  from jaxllm.tasks import mlm
  whole = _task(shared_data).train_batch(5, None)
  rows = _task(shared_data).train_batch(5, slice(2, 6))  # what one process of two reads
  for key, value in rows.items():
    np.testing.assert_array_equal(value, whole[key][:, 2:6])
  masks = jax.jit(lambda b: mlm.mask_batch(b, seed=1337, special=(0,), mask_id=99,
                                           vocab_size=99))
  first = jax.tree.map(lambda x: x[0], whole)
  part = jax.tree.map(lambda x: x[0], rows)
  for key, value in masks(part).items():
    np.testing.assert_array_equal(value, np.asarray(masks(first)[key])[2:6])
  # Microbatches cut the batch, not its masks: grad_accum=2 masks each window as 1 does.
  halves = _task(shared_data, "train.grad_accum=2").train_batch(5, None)
  stacked = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), halves)
  for key, value in masks(stacked).items():
    np.testing.assert_array_equal(value, masks(first)[key])
  assert float(np.asarray(masks(first)["selected"]).mean()) > 0.05
  other = masks({**first, "step_B": first["step_B"] + 1})
  assert (np.asarray(other["selected"]) != np.asarray(masks(first)["selected"])).any()


def test_the_final_report_reads_the_evaluation_batches_not_the_corpus(shared_data, tmp_path,
                                                                      monkeypatch):
  task = _task(shared_data)

  def whole_split(*args, **kwargs):
    raise AssertionError("the whole token split was loaded into memory")

  monkeypatch.setattr(token_files.TokenShards, "__array__", whole_split)
  figures = task.report(tmp_path, {}, {"val_loss": 1.0})
  assert figures["val_loss"] == 1.0
  assert 2.5 < figures["unigram_loss"] < 4.5 and 0.05 < figures["unigram_accuracy"] < 0.3


def test_padded_evaluation_rows_are_never_selected(shared_data):
  from jaxllm.tasks import mlm
  # 2 validation windows of 32 in a batch of 8: 6 padding rows, whose weight must be 0.
  task = _task(shared_data, "data.sampling=sliding", "train.eval_batches=0",
               "data.val_fraction=0.0035")
  (batch,) = list(task.eval_batches("val"))
  masked = mlm.mask_batch(batch, seed=1338, special=(), mask_id=99, vocab_size=99)
  real = batch["real_B"]
  assert 0 < real.sum() < len(real)
  assert not np.asarray(masked["selected"])[~real].any()
  assert np.asarray(masked["selected"])[real].any()
