"""The public API, used as a notebook would: only names of `import jaxllm`."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_convert import _tensors, _write_hf  # a random-weight GPT-2 in Hugging Face's format

import jaxllm


def test_the_api_names_are_there_and_load_on_first_use():
  assert {"load_config", "train", "load_run", "generate", "convert", "Run",
          "JaxllmError"} <= set(jaxllm.__all__) <= set(dir(jaxllm))
  with pytest.raises(AttributeError, match="no attribute 'trian'"):
    jaxllm.trian  # noqa: B018


def _greedy_by_forward_passes(run, ids, steps):
  """Greedy continuation by full forward passes (no cache): what `generate` must match. Each
  pass is one row of the final length, read at the last real position: the model is causal,
  so the padding after it changes nothing there, and one compiled program serves every pass."""
  length = len(ids) + steps
  forward = jax.jit(lambda tokens: run.model.apply({"params": run.params}, tokens))
  for _ in range(steps):
    logits = forward(jnp.asarray([ids + [0] * (length - len(ids))]))
    ids = ids + [int(jnp.argmax(logits[0, len(ids) - 1, :50257]))]
  return ids


def test_convert_load_generate_and_train(tmp_path, shared_data):
  sizes = jaxllm.convert(_write_hf(tmp_path / "hf", _tensors()), tmp_path / "gpt2")
  assert (sizes["n_layer"], sizes["n_head"], sizes["d_model"]) == (2, 4, 32)

  run = jaxllm.load_run(tmp_path / "gpt2")
  assert isinstance(run, jaxllm.Run) and run.config.model.vocab_size == 50257
  prompt = "Every effort moves you"
  text = jaxllm.generate(run, prompt, max_new_tokens=6, temperature=0.0)
  ids = run.tokenizer.encode(prompt)
  expected = _greedy_by_forward_passes(run, ids, 6)
  assert run.tokenizer.encode(prompt + text) == expected or text == run.tokenizer.decode(
      expected[len(ids):])
  assert jaxllm.generate(run, [prompt, prompt], max_new_tokens=6, temperature=0.0) == [text] * 2

  corpus = tmp_path / "verdict.txt"
  corpus.write_text((shared_data / "the-verdict.txt").read_text())
  config = jaxllm.load_config("experiments/verdict_gpt2.py", [
      f"train.init_from={tmp_path / 'gpt2'}", f"data.path={corpus}", "model.dropout=0.0",
      "train.epochs=0", "train.steps=4", "train.eval_every=4", "train.eval_batches=2",
      "train.sample_tokens=0", "train.peak_flops=1e11", "checkpoint.every_steps=0"])
  figures = jaxllm.train(config, tmp_path / "tuned", progress=False)
  records = [json.loads(line) for line in (tmp_path / "tuned" / "metrics.jsonl").open()]
  val = [r["val_loss"] for r in records if "val_loss" in r]
  assert len(val) == 2 and val[-1] < val[0]  # steps 0 and 4: it learned from the corpus
  assert figures["val_loss"] == pytest.approx(val[-1], rel=1e-6)

  tuned = jaxllm.load_run(tmp_path / "tuned")
  moved = [np.abs(np.asarray(a) - np.asarray(b)).max()
           for a, b in zip(jax.tree.leaves(tuned.params), jax.tree.leaves(run.params))]
  assert max(moved) > 0
  assert isinstance(jaxllm.generate(tuned, prompt, max_new_tokens=3, seed=1), str)


def test_api_errors_are_jaxllm_errors(tmp_path):
  with pytest.raises(jaxllm.JaxllmError, match="not found"):
    jaxllm.load_run(tmp_path / "nothing")
  with pytest.raises(jaxllm.JaxllmError, match="'jaxllm' or 'hf'"):
    jaxllm.convert(tmp_path, tmp_path / "out", to="onnx")
