"""Preference tuning (DPO): ln 2 at the start, masked prompts, the run and `jaxllm eval`."""

import functools
import json
import math

import jax
import numpy as np
import pytest

from jaxllm import cli
from jaxllm import config as config_lib
from jaxllm.data import instruction
from jaxllm.data.tokenizer import TiktokenTokenizer
from jaxllm.models.gpt import GPT, init_params
from jaxllm.tasks import dpo, losses

TINY = config_lib.ModelConfig(vocab_size=50257, context_length=128, n_layer=2, n_head=2,
                              d_model=32)
# A given peak FLOP/s spares each run the matmuls that would measure it for the MFU figure.
MICRO = ["--config.model.n_layer=1", "--config.model.n_head=2", "--config.model.d_model=32",
         "--config.model.context_length=128", "--config.train.peak_flops=1e11", "--no-progress"]


@pytest.fixture(scope="module")
def pairs(shared_data):
  records = json.loads((shared_data / "instruction-data-with-preference.json").read_text())[:8]
  encoded = dpo.encode_pairs(records, TiktokenTokenizer("gpt2"), "alpaca")
  return dpo.pair_batch(encoded, np.arange(8), pad_id=50256, max_length=128, pad_multiple=16)


def test_pairs_mask_the_prompt_and_padding(pairs, shared_data):
  record = json.loads((shared_data / "instruction-data-with-preference.json").read_text())[0]
  tokenizer = TiktokenTokenizer("gpt2")
  prompt = tokenizer.encode(instruction.format_prompt(record))
  chosen = tokenizer.encode(instruction.format_prompt(record) + instruction.format_response(
      {**record, "output": record["chosen"]})) + [tokenizer.eot_id]
  assert pairs["inputs_BxPxL"].shape[:2] == (8, 2) and pairs["weight_B"].tolist() == [1.0] * 8
  weights_L = pairs["weights_BxPxL"][0, 0]
  # Target j is token j + 1: weighted exactly for the response and its <|endoftext|>.
  assert np.flatnonzero(weights_L).tolist() == list(range(len(prompt) - 1, len(chosen) - 1))
  assert pairs["targets_BxPxL"][0, 0, :len(chosen) - 1].tolist() == chosen[1:]


def test_loss_is_ln2_when_the_policy_is_the_reference(pairs):
  model = GPT(TINY)
  backbone = init_params(model, jax.random.key(0))
  params = {"backbone": backbone, "reference": backbone, "head": {}}
  loss, aux = jax.jit(functools.partial(losses.dpo_loss, backbone=model, beta=0.1))(params, pairs)
  assert float(loss) == pytest.approx(math.log(2), abs=1e-7)
  assert float(aux["reward_margin"]) == 0.0 and float(aux["reward_accuracy"]) == 0.0
  # Another policy: the loss moves off ln 2 and the rewards say which way.
  other = {**params, "backbone": init_params(model, jax.random.key(1))}
  loss, aux = losses.dpo_loss(other, pairs, backbone=model, beta=0.1)
  assert abs(float(loss) - math.log(2)) > 1e-4
  sums = losses.dpo_sums(other, pairs, backbone=model, beta=0.1)
  assert float(sums["count"]) == 8
  assert float(sums["loss"]) / 8 == pytest.approx(float(loss), rel=1e-6)
  assert float(sums["reward_margin"]) / 8 == pytest.approx(float(aux["reward_margin"]), rel=1e-5)


def test_masked_prompt_tokens_change_no_gradient(pairs):
  model = GPT(TINY)
  params = {"backbone": init_params(model, jax.random.key(1)),
            "reference": init_params(model, jax.random.key(0)), "head": {}}
  loss_and_grad = jax.jit(jax.value_and_grad(
      lambda p, b: losses.dpo_loss(p, b, backbone=model, beta=0.1)[0]))
  loss, grads = loss_and_grad(params, pairs)
  masked = pairs["weights_BxPxL"] == 0
  assert masked.sum() > 500
  rng = np.random.default_rng(0)
  scrambled = {**pairs, "targets_BxPxL": np.where(
      masked, rng.integers(0, 50257, size=masked.shape), pairs["targets_BxPxL"]).astype(np.int32)}
  loss2, grads2 = loss_and_grad(params, scrambled)
  assert float(loss) == float(loss2)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads2)):
    np.testing.assert_array_equal(a, b)
  # The reference gets no gradient: it is frozen by construction, not only by the mask.
  assert all(float(np.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads["reference"]))


def test_instruct_then_dpo_then_eval(tmp_path, shared_data, capsys):
  records = json.loads((shared_data / "instruction-data-with-preference.json").read_text())[:60]
  (tmp_path / "prefs.json").write_text(json.dumps(records))
  sft = tmp_path / "sft"
  assert cli.main(["finetune", "--config", "experiments/instruct_alpaca_cpu.py",
                   "--workdir", str(sft), *MICRO, f"--config.data.path={tmp_path / 'prefs.json'}",
                   "--config.instruct.max_new_tokens=2", "--config.train.epochs=1",
                   # Only a start for DPO: evaluated at its ends, on one batch.
                   "--config.train.eval_every=0", "--config.train.eval_batches=1"]) == 0
  run = tmp_path / "dpo"
  status = cli.main(["finetune", "--config", "experiments/dpo_preference_cpu.py",
                     "--workdir", str(run), "--no-progress", f"--config.train.init_from={sft}",
                     f"--config.data.path={tmp_path / 'prefs.json'}",
                     "--config.train.learning_rate=3e-3", "--config.train.epochs=2",
                     "--config.train.eval_every=6", "--config.train.eval_batches=2",
                     "--config.train.peak_flops=1e11"])
  assert status == 0, capsys.readouterr().err
  metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  assert metrics[0]["step"] == 0
  assert metrics[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference
  assert metrics[0]["val_reward_margin"] == 0.0
  last = [r for r in metrics if "train_reward_margin" in r][-1]
  assert last["step"] == 2 * (51 // 8)
  # Measured after the 2 epochs: margin 0.37 and accuracy 1.0 on the 16 pairs evaluated.
  assert last["train_reward_margin"] > 0.05 and last["train_reward_accuracy"] > 0.6
  assert last["train_loss"] < math.log(2)
  figures = json.loads((run / "eval.json").read_text())
  assert {"train_reward_margin", "val_reward_accuracy", "test_loss"} <= figures.keys()
  assert figures["task"] == "dpo" and figures["initial_val_loss"] == pytest.approx(math.log(2))
  capsys.readouterr()
  # `jaxllm eval` reads the run back (its reference from train.init_from): the same figures.
  assert cli.main(["eval", "--workdir", str(run), "--no-progress"]) == 0
  again = json.loads((run / "eval.json").read_text())
  for key in ("train_reward_margin", "val_loss", "test_reward_accuracy"):
    assert again[key] == pytest.approx(figures[key], rel=1e-5, abs=1e-7)
