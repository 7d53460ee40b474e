"""Finetuning: optax masks from config, frozen parts bit-identical, the CLI end to end."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import cli
from jaxllm import config as config_lib
from jaxllm.errors import JaxllmError
from jaxllm.models import heads
from jaxllm.models.gpt import GPT, init_params
from jaxllm.tasks import common, losses
from jaxllm.training import step as train_lib

TINY = config_lib.ModelConfig(vocab_size=48, context_length=16, n_layer=3, n_head=2, d_model=32)
# A given peak FLOP/s spares each run the matmuls that would measure it for the MFU figure.
MICRO = ["--config.model.n_layer=1", "--config.model.n_head=2", "--config.model.d_model=32",
         "--config.model.context_length=96", "--config.train.peak_flops=1e11", "--no-progress"]


def _params():
  model = GPT(TINY)
  return model, {"backbone": init_params(model, jax.random.key(0)),
                 "head": heads.classifier_init(jax.random.key(1), TINY.d_model, 2)}


def test_trainable_groups_select_what_the_book_trains():
  _, params = _params()
  mask = common.trainable_mask(params, "head,last_block,final_norm", TINY.n_layer)
  paths = jax.tree.leaves(common.parameter_paths(params))
  chosen = {p for p, m in zip(paths, jax.tree.leaves(mask)) if m}
  assert "head/kernel" in chosen and "backbone/ln_f/scale" in chosen
  assert "backbone/blocks_2/attn/qkv/kernel" in chosen
  assert not any(p.startswith(("backbone/blocks_0", "backbone/blocks_1", "backbone/wte"))
                 for p in chosen)
  d = 32  # last block: 2 LayerNorms, qkv, out, fc, proj (with biases); final norm; head
  block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
  assert common.count_trainable(params, mask) == block + 2 * d + (d * 2 + 2)
  regex = common.trainable_mask(params, r"head,backbone/blocks_\d/attn", TINY.n_layer)
  assert common.count_trainable(params, regex) == 3 * (d * 3 * d + 3 * d + d * d + d) + d * 2 + 2
  with pytest.raises(JaxllmError, match="'lasst_block' selects no parameter"):
    common.trainable_mask(params, "head,lasst_block", TINY.n_layer)
  with pytest.raises(JaxllmError, match="is empty"):
    common.trainable_mask(params, " , ", TINY.n_layer)


def test_a_frozen_backbone_stays_bit_identical():
  model, params = _params()
  mask = common.trainable_mask(params, "head", TINY.n_layer)
  train = config_lib.default_config().train
  train.learning_rate, train.warmup_steps, train.weight_decay = 1e-2, 0, 0.1
  optimizer = train_lib.make_optimizer(train, 10, mask)
  step = jax.jit(functools.partial(
      train_lib.train_step, loss_fn=functools.partial(losses.classification_loss, backbone=model),
      optimizer=optimizer, trainable=mask))
  rng = np.random.default_rng(0)
  batch = {"tokens_BxL": jnp.asarray(rng.integers(0, 48, size=(4, 12)), jnp.int32),
           "length_B": jnp.array([12, 5, 8, 3]), "label_B": jnp.array([1, 0, 1, 0])}
  batch = {k: v[None] for k, v in batch.items()}  # one microbatch
  state = train_lib.create_train_state(params, optimizer, seed=0)
  history = []
  for _ in range(5):
    state, metrics = step(state, batch)
    history.append(float(metrics["loss"]))
  assert history[-1] < history[0]
  for after, before in zip(jax.tree.leaves(state.params["backbone"]),
                           jax.tree.leaves(params["backbone"])):
    np.testing.assert_array_equal(after, before)  # weight decay did not touch it either
  assert not np.array_equal(state.params["head"]["kernel"], params["head"]["kernel"])
  assert float(metrics["accuracy"]) >= 0.5


def test_classifier_then_instructions_end_to_end(tmp_path, shared_data, capsys, judge_server):
  spam = tmp_path / "spam"
  status = cli.main(["finetune", "--config", "experiments/spam_classifier_cpu.py",
                     "--workdir", str(spam), *MICRO,
                     f"--config.data.path={shared_data / 'SMSSpamCollection'}",
                     "--config.classifier.max_length=96", "--config.train.epochs=0",
                     "--config.train.steps=60", "--config.train.eval_every=30"])
  assert status == 0, capsys.readouterr().err
  figures = json.loads((spam / "eval.json").read_text())
  assert figures["steps"] == 60
  assert figures["test"]["count"] == 300 and figures["val"]["count"] == 149
  assert figures["train"]["count"] == 1045
  assert figures["test_accuracy"] > 0.8  # 60 steps of a 1-layer model (measured 0.953)
  assert sum(map(sum, figures["test"]["confusion"])) == 300
  assert {"precision", "recall", "f1"} <= figures["test"].keys()
  records = [json.loads(line) for line in (spam / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if "val_accuracy" in r] == [0, 30, 60]
  capsys.readouterr()

  # `jaxllm eval` reads the run back (GPT in params/, head in head/): the same figures.
  assert cli.main(["eval", "--workdir", str(spam), "--no-progress"]) == 0
  again = json.loads((spam / "eval.json").read_text())
  assert again["test_accuracy"] == figures["test_accuracy"]
  assert again["steps"] == 60  # training's figures are kept

  # Instruction finetuning from that run's backbone (train.init_from), on 60 records.
  data = json.loads((shared_data / "instruction-data.json").read_text())[:60]
  (tmp_path / "records.json").write_text(json.dumps(data))
  chat = tmp_path / "chat"
  status = cli.main(["finetune", "--config", "experiments/instruct_alpaca_cpu.py",
                     "--workdir", str(chat), "--no-progress",
                     f"--config.train.init_from={spam}",
                     f"--config.data.path={tmp_path / 'records.json'}",
                     "--config.instruct.max_new_tokens=6", "--config.instruct.pad_multiple=96",
                     "--config.train.learning_rate=3e-3", "--config.train.peak_flops=1e11",
                     "--config.train.epochs=3", "--config.train.eval_every=100"])
  assert status == 0, capsys.readouterr().err
  figures = json.loads((chat / "eval.json").read_text())
  assert figures["steps"] == 3 * (51 // 8)
  assert figures["val_loss"] < figures["initial_val_loss"] - 1.0
  responses = json.loads((chat / "instruction-data-with-response.json").read_text())
  assert figures["responses"] == str(chat / "instruction-data-with-response.json")
  assert [r["instruction"] for r in responses] == [r["instruction"] for r in data[51:57]]
  assert all(set(r) == {"instruction", "input", "output", "model_response"} for r in responses)
  config = json.loads((chat / "config.json").read_text())
  assert config["model"]["n_layer"] == 1 and config["train"]["init_from"] == str(spam)
  capsys.readouterr()

  # Scoring the responses afterwards: `jaxllm eval` with a judge (a real local HTTP server).
  assert cli.main(["eval", "--workdir", str(chat), "--no-progress",
                   f"--config.judge.url={judge_server.url}", "--config.judge.model=judge"]) == 0
  judged = json.loads((chat / "eval.json").read_text())
  assert judged["judge_score"] == pytest.approx((85 + 40 + 85 + 40) / 4)  # 6 replies, 2 unparsable
  assert judged["judge_scored"] == 4 and judged["judge_unparsed"] == 2
  assert judged["val_loss"] == pytest.approx(figures["val_loss"], rel=1e-6)
  assert len(judge_server.requests) == 6 and judge_server.requests[0][1]["model"] == "judge"
  capsys.readouterr()

  # The result is a plain run directory: generate and perplexity read it.
  assert cli.main(["generate", "--workdir", str(chat), "--prompt", "Below is",
                   "--max-new-tokens", "4", "--temperature", "0"]) == 0
  assert capsys.readouterr().out.startswith("Below is")
  text = tmp_path / "text.txt"
  text.write_text((shared_data / "the-verdict.txt").read_text()[:3000])
  assert cli.main(["eval", "--workdir", str(chat), "--text", str(text), "--no-progress"]) == 0
  assert "perplexity" in capsys.readouterr().out


def test_config_errors_are_one_line(tmp_path, shared_data, capsys):
  def error(*extra):
    status = cli.main(["finetune", "--config", "experiments/spam_classifier_cpu.py",
                       "--workdir", str(tmp_path / "x"), *MICRO, *extra])
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jaxllm: error: ")
    return err[0]

  assert "set data.path" in error()
  assert "unknown config key 'lora.rnak'" in error("--config.lora.rnak=4")
  assert "is not a run directory" in error(f"--config.train.init_from={tmp_path}")
  bad = tmp_path / "bad.tsv"
  bad.write_text("ham\thello\nspam\tbuy\nsapm\toops\n")
  assert f"{bad}:3: unknown label 'sapm'" in error(f"--config.data.path={bad}")
  assert "train.task must be one of" in error("--config.train.task=regress")
  # Keys that moved when finetuning joined the trainer name their new place.
  assert "'classifier.path' is now 'data.path'" in error("--config.classifier.path=x")
  assert "'finetune.init_from' is now 'train.init_from'" in error(
      "--config.finetune.init_from=x")


def test_how_the_network_runs_is_this_runs_under_init_from(tmp_path, shared_data, capsys):
  """model.matmul_dtype, scan_layers, remat, dtype and dropout are this run's, not
  train.init_from's: recorded in config.json, and per-layer and stacked parameters are read
  into either layout (the first evaluation sees the starting run's weights)."""
  corpus = tmp_path / "verdict.txt"
  corpus.write_text((shared_data / "the-verdict.txt").read_text())
  common_args = ["--config", "experiments/shakespeare_char.py", "--no-progress",
                 "--config.data.dataset=text", f"--config.data.path={corpus}",
                 "--config.data.train_split=train", f"--config.data.data_dir={tmp_path}/tfds",
                 "--config.model.preset=gpt-micro", "--config.train.batch_size=4",
                 "--config.train.eval_every=4", "--config.train.eval_batches=2",
                 "--config.train.steps=4", "--config.train.sample_tokens=0",
                 "--config.train.peak_flops=1e11"]

  def run(name, *extra):
    assert cli.main(["train", "--workdir", str(tmp_path / name), *common_args, *extra]) == 0, (
        capsys.readouterr().err)
    capsys.readouterr()
    records = [json.loads(line) for line in
               (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    config = json.loads((tmp_path / name / "config.json").read_text())
    return [r["val_loss"] for r in records if "val_loss" in r], config["model"]

  start, _ = run("start")
  scanned, model = run("scanned", f"--config.train.init_from={tmp_path / 'start'}",
                       "--config.model.scan_layers=true", "--config.model.remat=full")
  assert (model["scan_layers"], model["remat"]) == (True, "full")
  assert scanned[0] == pytest.approx(start[-1], abs=1e-6)  # the same weights, stacked
  back, model = run("back", f"--config.train.init_from={tmp_path / 'scanned'}",
                    "--config.model.matmul_dtype=bfloat16")
  assert (model["scan_layers"], model["matmul_dtype"]) == (False, "bfloat16")
  # Per layer again, with bf16 operands (8 bits: the loss moves by ~1e-3, not by training).
  assert back[0] == pytest.approx(scanned[-1], abs=2e-2) and back[0] != scanned[-1]
