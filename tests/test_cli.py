"""The `jaxllm` command end to end: train, generate, and one-line errors for bad input."""

import json
import os
import subprocess
import sys

import numpy as np
from test_metrics import read_events

from jaxllm import cli
from jaxllm.training import rundir as run_io

TINY = ["--config.model.preset=gpt-micro", "--config.data.tokenizer=char",
        "--config.train.batch_size=4", "--config.train.eval_batches=2", "--config.train.log_every=5",
        "--config.train.peak_flops=1e11", "--config.train.sample_tokens=10", "--no-progress"]


def _error_line(capsys) -> str:
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1, err  # one line, no traceback
  assert err[0].startswith("jaxllm: error: ")
  return err[0]


def _train(workdir, *extra):
  return cli.main(["train", "--config", "experiments/shakespeare_char.py", "--workdir",
                   str(workdir), *TINY, *extra])


def _train_text(workdir, corpus, *extra):
  return _train(workdir, "--config.data.dataset=text", f"--config.data.path={corpus}",
                "--config.data.train_split=train", *extra)


def test_train_then_generate(tmp_path, shared_data, capsys):
  corpus = tmp_path / "verdict.txt"
  corpus.write_text((shared_data / "the-verdict.txt").read_text())
  workdir = tmp_path / "run"
  status = _train_text(workdir, corpus, "--config.train.steps=30", "--config.train.eval_every=15")
  assert status == 0
  out = capsys.readouterr().out
  assert "--- sample" in out and "val loss" in out

  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if "val_loss" in r] == [0, 15, 30]
  assert [r["step"] for r in records if "loss" in r] == [5, 10, 15, 20, 25, 30]
  assert all({"lr", "tokens_per_s", "mfu", "grad_norm"} <= r.keys() for r in records if "loss" in r)
  # A 2-layer char model learns something in 30 steps: validation loss falls.
  assert records[-1]["val_loss"] < records[0]["val_loss"] - 0.3
  config = json.loads((workdir / "config.json").read_text())
  assert config["model"]["n_layer"] == 2 and config["model"]["vocab_size"] > 26
  assert (workdir / "loss.png").stat().st_size > 10_000
  scalars = read_events(workdir / "tensorboard")  # the same figures for TensorBoard
  assert sorted(scalars["eval/val_loss"]) == [0, 15, 30]
  np.testing.assert_allclose([scalars["train/loss"][r["step"]] for r in records if "loss" in r],
                             [r["loss"] for r in records if "loss" in r], rtol=1e-6)

  assert cli.main(["generate", "--workdir", str(workdir), "--prompt", "The",
                   "--max-new-tokens", "12", "--temperature", "0"]) == 0
  first = capsys.readouterr().out
  assert first.startswith("The") and len(first.rstrip("\n")) >= 3
  assert cli.main(["generate", "--workdir", str(workdir), "--prompt", "The",
                   "--max-new-tokens", "12", "--temperature", "0"]) == 0
  assert capsys.readouterr().out == first  # greedy is deterministic

  # Past the context (32): as nanoGPT's sample.py, by a sliding window.
  assert cli.main(["generate", "--workdir", str(workdir), "--prompt", "The",
                   "--max-new-tokens", "500", "--temperature", "0"]) == 0
  long = capsys.readouterr().out
  assert long.startswith(first.rstrip("\n")) and len(long.rstrip("\n")) > 200
  assert cli.main(["generate", "--workdir", str(workdir), "--prompt", "The end " * 5]) == 2
  assert "a prompt of 40 tokens is longer than the context length 32" in _error_line(capsys)

  # `jaxllm eval` applies how the network runs (model.matmul_dtype, scan_layers) and refuses
  # what would change what it is, or keys a perplexity never reads.
  def loss(*overrides):
    assert cli.main(["eval", "--workdir", str(workdir), "--text", str(corpus), "--no-progress",
                     *overrides]) == 0
    return capsys.readouterr().out.split(" loss ", 1)[1].split(",")[0]

  assert loss("--config.model.scan_layers=true") == loss()  # stacked: the same sums
  _, model, params, _ = run_io.load_run(
      workdir, overrides=["model.matmul_dtype=bfloat16", "model.scan_layers=true"])
  assert (model.config.matmul_dtype, model.config.scan_layers, "blocks" in params) == (
      "bfloat16", True, True)
  for override, message in (
      ("--config.model.n_layer=3", "--config.model.n_layer: the architecture of"),
      ("--config.judge.url=http://x", "--config.judge.url has no effect on `jaxllm eval --text`")):
    assert cli.main(["eval", "--workdir", str(workdir), "--text", str(corpus), override]) == 2
    assert message in _error_line(capsys)


def test_zero_intervals_mean_only_at_the_ends(tmp_path, shared_data, capsys):
  corpus = tmp_path / "verdict.txt"
  corpus.write_text((shared_data / "the-verdict.txt").read_text())
  assert _train_text(tmp_path / "run", corpus, "--config.train.steps=6",
                     "--config.train.eval_every=0", "--config.train.log_every=0",
                     "--config.train.sample_tokens=0") == 0
  records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text(
      ).splitlines()]
  assert [(r["step"], "loss" in r, "val_loss" in r) for r in records] == [
      (0, False, True), (6, True, True)]
  capsys.readouterr()
  assert _train_text(tmp_path / "bad", corpus, "--config.train.grad_accum=0") == 2
  assert "train.grad_accum must be at least 1, got 0" in _error_line(capsys)


def test_unknown_config_key_is_named(tmp_path, capsys):
  assert _train(tmp_path, "--config.train.stepz=3") == 2
  assert "unknown config key 'train.stepz'" in _error_line(capsys)


def test_unknown_preset(tmp_path, capsys):
  assert _train(tmp_path, "--config.model.preset=gpt5") == 2
  assert "unknown preset 'gpt5'" in _error_line(capsys)


def test_unknown_dataset(tmp_path, capsys):
  assert _train(tmp_path, "--config.data.dataset=no_such_dataset") == 2
  assert "no_such_dataset" in _error_line(capsys)


def test_missing_corpus_file(tmp_path, capsys):
  assert _train_text(tmp_path, tmp_path / "missing.txt") == 2
  assert "missing.txt" in _error_line(capsys)


def test_empty_corpus(tmp_path, capsys):
  (tmp_path / "empty.txt").write_text("")
  assert _train_text(tmp_path, tmp_path / "empty.txt") == 2
  assert "empty" in _error_line(capsys)


def test_corpus_shorter_than_context(tmp_path, capsys):
  (tmp_path / "short.txt").write_text("To be, or not to be, that is the question.\n")
  assert _train_text(tmp_path, tmp_path / "short.txt") == 2
  assert "fewer than context_length + 1 = 33" in _error_line(capsys)


def test_generate_without_a_run(tmp_path, capsys):
  assert cli.main(["generate", "--workdir", str(tmp_path / "nothing")]) == 2
  assert "config.json not found" in _error_line(capsys)


def test_installed_command_prints_one_line(tmp_path):
  """The real console entry point: no traceback reaches the user."""
  result = subprocess.run(
      [sys.executable, "-m", "jaxllm.cli", "train", "--config", "experiments/shakespeare_char.py",
       "--workdir", str(tmp_path), "--config.model.n_layr=2"],
      capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  assert result.stderr.strip() == (
      "jaxllm: error: unknown config key 'model.n_layr' (section 'model' has: architecture, "
      "bias, context_length, d_model, dropout, dtype, embedding_init_std, layer_norm_epsilon, "
      "logit_softcap, matmul_dtype, mlp, mlp_hidden, n_head, n_kv_head, n_layer, norm, "
      "position, pre_norm, preset, qk_norm, qkv_bias, remat, rope_high_freq_factor, "
      "rope_low_freq_factor, rope_original_context, rope_scaling_factor, rope_theta, "
      "scan_layers, tie_embeddings, type_vocab_size, value_residual, vocab_size, x0_shortcut, "
      "zero_init_proj)")


def test_malloc_tuning_applies_on_glibc_and_can_be_turned_off(monkeypatch):
  import platform

  from jaxllm import malloc
  monkeypatch.setenv("JAXLLM_MALLOC_TUNING", "0")
  assert malloc.tune() is False
  monkeypatch.setenv("JAXLLM_MALLOC_TUNING", "1")
  assert malloc.tune() is (platform.libc_ver()[0] == "glibc")


def test_a_second_run_loads_its_compiled_programs_from_the_cache(tmp_path, shared_data):
  """jaxllm/compile_cache.py: the first run writes its compiled programs to
  $JAXLLM_COMPILATION_CACHE, the second loads them (JAX logs each hit) and computes the same
  losses, bit for bit."""
  env = {**os.environ, "JAXLLM_COMPILATION_CACHE": str(tmp_path / "xla"), "JAX_LOG_COMPILES": "1"}

  def run(name):
    workdir = tmp_path / name
    result = subprocess.run(
        [sys.executable, "-m", "jaxllm.cli", "train", "--config", "experiments/shakespeare_char.py",
         "--workdir", str(workdir), *TINY, "--config.data.dataset=text",
         f"--config.data.path={shared_data / 'the-verdict.txt'}",
         "--config.data.train_split=train", "--config.train.steps=5"],
        env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in records], result.stderr

  first, log = run("first")
  assert "Persistent compilation cache hit for 'jit_step'" not in log
  assert any(p.name.startswith("jit_step-") for p in (tmp_path / "xla").iterdir())
  second, log = run("second")
  assert "Persistent compilation cache hit for 'jit_step'" in log
  assert second == first


def test_the_compilation_cache_can_be_turned_off(monkeypatch):
  from jaxllm import compile_cache
  monkeypatch.setenv("JAXLLM_COMPILATION_CACHE", "0")
  assert compile_cache.enable() is None
