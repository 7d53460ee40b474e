"""Instruction data: the book's template byte for byte, splits, masking, bucketed batches."""

import functools
import json
import re

import jax
import ml_collections
import numpy as np
import optax
import pytest

from jaxllm import config as config_lib
from jaxllm.data import instruction
from jaxllm.data.tokenizer import TiktokenTokenizer
from jaxllm.errors import JaxllmError
from jaxllm.models.gpt import GPT, init_params
from jaxllm.tasks import losses
from jaxllm.training import sharding

EOT = 50256
WITH_INPUT = {"instruction": "Identify the correct spelling of the following word.",
              "input": "Ocassion", "output": "The correct spelling is 'Occasion.'"}
NO_INPUT = {"instruction": "What is an antonym of 'complicated'?", "input": "",
            "output": "An antonym of 'complicated' is 'simple'."}


def test_alpaca_template_is_the_books_byte_for_byte():
  text = (instruction.format_prompt(WITH_INPUT, "alpaca")
          + instruction.format_response(WITH_INPUT, "alpaca"))
  assert text == (
      "Below is an instruction that describes a task. Write a response that appropriately "
      "completes the request.\n\n### Instruction:\nIdentify the correct spelling of the "
      "following word.\n\n### Input:\nOcassion\n\n### Response:\nThe correct spelling is "
      "'Occasion.'")
  # An empty input leaves out the whole "### Input:" section.
  assert instruction.format_prompt(NO_INPUT, "alpaca") == (
      "Below is an instruction that describes a task. Write a response that appropriately "
      "completes the request.\n\n### Instruction:\nWhat is an antonym of 'complicated'?")
  assert (instruction.format_prompt(WITH_INPUT, "phi3")
          + instruction.format_response(WITH_INPUT, "phi3")) == (
      "<|user|>\nIdentify the correct spelling of the following word.\nOcassion\n"
      "<|assistant|>\nThe correct spelling is 'Occasion.'")
  assert instruction.clean_response("### Response:\n  Simple.  ", "alpaca") == "Simple."
  with pytest.raises(JaxllmError, match="unknown prompt template 'chatml'"):
    instruction.format_prompt(WITH_INPUT, "chatml")


def test_book_split_and_eos(shared_data):
  records = instruction.read_records(shared_data / "instruction-data.json")
  splits = instruction.split_records(records, 0.85, 0.1)
  assert [len(splits[s]) for s in ("train", "test", "val")] == [935, 110, 55]
  assert splits["train"][0] == records[0] and splits["val"][-1] == records[-1]
  assert splits["test"][0] == records[935]  # the book's order: train, test, validation
  encoded = instruction.encode(splits["train"][:3], TiktokenTokenizer("gpt2"), "alpaca")
  assert all(t[-1] == EOT for t in encoded.tokens)  # EOS appended
  # The prompt's tokens are the text's first tokens (the template's boundary is clean).
  tokenizer = TiktokenTokenizer("gpt2")
  prompt = tokenizer.encode(instruction.format_prompt(splits["train"][0]))
  assert list(encoded.tokens[0][:len(prompt)]) == prompt
  assert encoded.prompt_length[0] == len(prompt)


def test_batches_match_the_books_collate():
  # The book's custom_collate_fn example: inputs [0..4], [5, 6], [7, 8, 9].
  data = instruction.Encoded([np.array(t + [EOT]) for t in ([0, 1, 2, 3, 4], [5, 6], [7, 8, 9])],
                             np.array([2, 1, 2]))
  batch = instruction.make_batch(data, [0, 1, 2], pad_id=EOT, max_length=1024)
  assert batch["inputs_BxL"].tolist() == [[0, 1, 2, 3, 4], [5, 6, EOT, EOT, EOT],
                                          [7, 8, 9, EOT, EOT]]
  targets = np.where(batch["weights_BxL"] > 0, batch["targets_BxL"], -100)
  assert targets.tolist() == [[1, 2, 3, 4, EOT], [6, EOT, -100, -100, -100],
                              [8, 9, EOT, -100, -100]]
  masked = instruction.make_batch(data, [0, 1, 2], pad_id=EOT, max_length=1024, mask_prompt=True,
                                  pad_multiple=8)
  assert masked["inputs_BxL"].shape == (3, 8)
  assert masked["weights_BxL"][:, :6].tolist() == [[0, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0],
                                                   [0, 1, 1, 0, 0, 0]]
  truncated = instruction.make_batch(data, [0], pad_id=EOT, max_length=3)
  assert truncated["inputs_BxL"].tolist() == [[0, 1, 2]]
  assert truncated["targets_BxL"].tolist() == [[1, 2, 3]]


def test_masked_positions_contribute_exactly_zero_gradient():
  model = GPT(config_lib.ModelConfig(vocab_size=64, context_length=16, n_layer=2, n_head=2,
                                     d_model=32))
  params = {"backbone": init_params(model, jax.random.key(0)), "head": {}}
  rng = np.random.default_rng(0)
  data = instruction.Encoded([rng.integers(0, 63, size=n) for n in (12, 7, 9)],
                             np.array([5, 3, 4]))
  batch = instruction.make_batch(data, [0, 1, 2], pad_id=63, max_length=16, pad_multiple=16,
                                 mask_prompt=True)
  loss_and_grad = jax.jit(jax.value_and_grad(
      lambda p, b: losses.instruction_loss(p, b, backbone=model)[0]))
  loss, grads = loss_and_grad(params, batch)

  # Any other target at a masked position (prompt or padding): the same loss and gradient,
  # to the bit.
  scrambled = dict(batch)
  masked_BxL = batch["weights_BxL"] == 0
  assert masked_BxL.sum() > 20
  scrambled["targets_BxL"] = np.where(masked_BxL, rng.integers(0, 64, size=masked_BxL.shape),
                                      batch["targets_BxL"]).astype(np.int32)
  loss2, grads2 = loss_and_grad(params, scrambled)
  assert float(loss) == float(loss2)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads2)):
    np.testing.assert_array_equal(a, b)
  # The loss is the mean over the response tokens alone.
  losses_BxL = losses.token_losses(params, batch, backbone=model)
  expected = np.asarray(losses_BxL)[~masked_BxL].mean()
  np.testing.assert_allclose(float(loss), expected, rtol=1e-6)


def test_bucketed_batches_waste_little_padding(shared_data):
  records = instruction.split_records(
      instruction.read_records(shared_data / "instruction-data.json"), 0.85, 0.1)
  data = instruction.encode(records["train"], TiktokenTokenizer("gpt2"), "alpaca")

  def padding(sampler):
    rows = sampler.epoch(0)
    lengths = [[len(data.tokens[r]) for r in batch] for batch in rows]
    return sum(len(b) * max(b) - sum(b) for b in lengths), np.concatenate(rows)

  plain_waste, plain_rows = padding(instruction.Batches(data.lengths, 8, seed=123))
  sorted_waste, sorted_rows = padding(instruction.Batches(data.lengths, 8, seed=123,
                                                          bucket_batches=20))
  assert len(sorted_rows) == len(set(sorted_rows.tolist())) == 116 * 8  # drop_last, no repeats
  assert sorted(sorted_rows.tolist()) == sorted(plain_rows.tolist())  # the same examples
  assert sorted_waste < plain_waste / 4
  epoch_1 = instruction.Batches(data.lengths, 8, seed=123, bucket_batches=20).epoch(1)
  assert not np.array_equal(np.concatenate(epoch_1), sorted_rows)  # reshuffled per epoch


@pytest.mark.parametrize("name, content, message", [
    ("data.json", '[\n  {"instruction": "a", "input": "", "output": "b"},\n'
                  '  {"instruction": "c",\n   "input": ""}\n]',
     r"data\.json:3: record has no 'output'"),
    ("data.jsonl", '{"instruction": "a", "output": "b"}\n{"input": "x", "output": "y"}\n',
     r"data\.jsonl:2: record has no 'instruction'"),
    ("data.json", '[{"instruction": "a", "output": "b"},\n {"instruction": "c" "output"}]',
     r"data\.json:2: not valid JSON"),
])
def test_malformed_records_are_one_line_errors(tmp_path, name, content, message):
  path = tmp_path / name
  path.write_text(content)
  with pytest.raises(JaxllmError, match=message) as info:
    instruction.read_records(path)
  assert "\n" not in str(info.value)


def test_non_utf8_and_jsonl_records(tmp_path):
  path = tmp_path / "data.jsonl"
  path.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "\xff", "output": "c"}\n')
  with pytest.raises(JaxllmError, match=r"data\.jsonl:2: byte 0xff .* not UTF-8"):
    instruction.read_records(path)
  path.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
  assert instruction.read_records(path) == [{"instruction": "a", "output": "b", "input": ""}]


def test_instruction_losses_go_through_the_models_own_lm_head():
  """One LM head: the GPT's, with its bf16-operand matmuls (model.matmul_dtype) and the
  logits' sharding constraint (vocab over "tensor"), tied and untied."""
  rng = np.random.default_rng(2)
  batch = {"inputs_BxL": rng.integers(0, 40, size=(2, 10)).astype(np.int32),
           "targets_BxL": rng.integers(0, 40, size=(2, 10)).astype(np.int32)}
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1}))
  rules = sharding.logical_rules()
  for tie in (True, False):
    model = GPT(config_lib.ModelConfig(vocab_size=40, context_length=16, n_layer=1, n_head=2,
                                       d_model=32, matmul_dtype="bfloat16", tie_embeddings=tie))
    params = {"backbone": init_params(model, jax.random.key(0)), "head": {}}
    logits_BxLxV = model.apply({"params": params["backbone"]}, batch["inputs_BxL"])
    expected_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV,
                                                                   batch["targets_BxL"])
    token_losses = functools.partial(losses.token_losses, backbone=model)
    np.testing.assert_array_equal(token_losses(params, batch), expected_BxL)
    step = sharding.jit_eval_step(token_losses, None, mesh, rules)
    lowered = step.lower(params, batch).as_text()
    assert re.search(r"sharding_constraint .*\{\"tensor\"\}\]> : tensor<2x10x40xf32>", lowered)
