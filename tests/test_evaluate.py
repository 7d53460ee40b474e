"""Evaluation: classifier metrics, perplexity, the book's responses file, the judge over HTTP."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import config as config_lib
from jaxllm.data import instruction
from jaxllm.data.tokenizer import CharTokenizer
from jaxllm.errors import JaxllmError
from jaxllm.eval import figures, responses
from jaxllm.models import heads
from jaxllm.models.gpt import GPT, init_params
from jaxllm.serve import generate as generate_lib
from jaxllm.tasks import losses

RECORDS = [{"instruction": "Name a color.", "input": "", "output": "Blue."},
           {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5."},
           {"instruction": "Say hi.", "input": "", "output": "Hi."}]


def test_classification_metrics():
  confusion = [[3, 1], [2, 4]]  # rows true, columns predicted: 10 examples, 7 right
  report = figures.classification_metrics(np.array(confusion), ["ham", "spam"])
  assert report["confusion"] == confusion and report["count"] == 10
  assert report["accuracy"] == pytest.approx(0.7)
  assert report["precision"] == pytest.approx(4 / 5)  # of spam, the positive class
  assert report["recall"] == pytest.approx(4 / 6)
  assert report["f1"] == pytest.approx(2 * 0.8 * (4 / 6) / (0.8 + 4 / 6))
  three = figures.classification_metrics(np.array([[1, 0, 0], [0, 1, 1], [0, 0, 1]]),
                                          ["a", "b", "c"])
  assert three["precision"] == pytest.approx((1 + 1 + 0.5) / 3)  # macro
  assert three["recall"] == pytest.approx((1 + 0.5 + 1) / 3)


def test_the_classifier_step_sums_the_confusion_matrix_of_its_real_rows():
  model = GPT(config_lib.ModelConfig(vocab_size=50, context_length=8, n_layer=1, n_head=2,
                                     d_model=16))
  params = {"backbone": init_params(model, jax.random.key(0)),
            "head": heads.classifier_init(jax.random.key(1), 16, 3)}
  rng = np.random.default_rng(0)
  batch = {"tokens_BxL": rng.integers(0, 50, size=(6, 8)).astype(np.int32),
           "length_B": np.array([8, 3, 5, 8, 2, 1], np.int32),
           "label_B": np.array([0, 1, 2, 2, 1, 0], np.int32),
           "weight_B": np.array([1, 1, 1, 1, 1, 0], np.float32)}  # the last row is padding
  sums = losses.classification_sums(params, batch, backbone=model, num_classes=3)
  logits_BxC = np.asarray(losses.classifier_logits(params, batch, backbone=model))
  predicted_B = logits_BxC.argmax(axis=-1)
  expected = np.zeros((3, 3))
  np.add.at(expected, (batch["label_B"][:5], predicted_B[:5]), 1)
  np.testing.assert_array_equal(sums["confusion"], expected)
  assert float(sums["count"]) == 5 and expected.sum() == 5
  assert float(sums["accuracy"]) == np.trace(expected)
  log_p_BxC = logits_BxC - np.log(np.exp(logits_BxC).sum(axis=-1, keepdims=True))
  loss = -log_p_BxC[np.arange(5), batch["label_B"][:5]].sum()
  assert float(sums["loss"]) == pytest.approx(loss, rel=1e-6)


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
  model = GPT(config_lib.ModelConfig(vocab_size=50, context_length=8, n_layer=1, n_head=2,
                                     d_model=16))
  zeros = jax.tree.map(jnp.zeros_like, init_params(model, jax.random.key(0)))  # logits all 0
  tokens = np.arange(40, dtype=np.int32) % 50
  result = figures.perplexity(model, zeros, tokens, batch_size=2)
  assert result["tokens"] == 32  # windows start at 0, 8, 16, 24 (the book's stride rule)
  assert result["loss"] == pytest.approx(np.log(50), rel=1e-6)
  assert result["perplexity"] == pytest.approx(50.0, rel=1e-5)


def test_responses_in_the_books_format():
  prompts = "".join(instruction.format_prompt(r) + instruction.format_response(r) for r in RECORDS)
  tokenizer = CharTokenizer.from_corpus(prompts)
  model = GPT(config_lib.ModelConfig(vocab_size=tokenizer.vocab_size, context_length=256,
                                     n_layer=1, n_head=2, d_model=16))
  params = init_params(model, jax.random.key(0))
  entries = responses.generate_responses(model, params, tokenizer, RECORDS, template="alpaca",
                                        max_new_tokens=5, batch_size=2, progress=False)
  assert [list(e) for e in entries] == [["instruction", "input", "output", "model_response"]] * 3
  assert [e["output"] for e in entries] == [r["output"] for r in RECORDS]
  # Each response is the greedy continuation of its own prompt (decoded one prompt at a time
  # without a cache), whatever it was batched with, the response marker stripped.
  for record, entry in zip(RECORDS, entries):
    prompt = tokenizer.encode(instruction.format_prompt(record))
    tokens = generate_lib.generate_uncached(model, params, [prompt], 5, temperature=0.0,
                                            eot_id=tokenizer.eot_id)[0]
    assert entry["model_response"] == instruction.clean_response(tokenizer.decode(tokens),
                                                                 "alpaca")
  assert len({e["model_response"] for e in entries}) > 1  # not one string for every prompt


def test_judge_scores_over_a_real_http_server(judge_server):
  entries = [{**r, "model_response": f"answer {i}"} for i, r in enumerate(RECORDS)]
  result = responses.judge_responses(entries, url=judge_server.url, model="llama3",
                                    progress=False)
  assert result["scores"] == [85, 40, None]
  assert result["judge_score"] == pytest.approx(62.5)
  assert result["judge_scored"] == 2 and result["judge_unparsed"] == 1
  path, body = judge_server.requests[1]
  assert path == "/v1/chat/completions"
  assert body["model"] == "llama3" and body["temperature"] == 0.0
  prompt = body["messages"][0]["content"]
  assert body["messages"][0]["role"] == "user"
  assert prompt == (
      "Given the input `" + instruction.format_prompt(RECORDS[1]) + "` and correct output `5.`, "
      "score the model response `answer 1` on a scale from 0 to 100, where 100 is the best "
      "score. Respond with the integer number only.")
  # A URL ending in /v1 works too; a closed port is a one-line error.
  assert responses.query_judge("x", url=judge_server.url + "/v1/", model="m") == "Score: 85"
  with pytest.raises(JaxllmError, match="unreachable"):
    responses.query_judge("x", url="http://127.0.0.1:9", model="m", timeout=2)


def test_parse_score():
  assert responses.parse_score("87") == 87
  assert responses.parse_score("The score is 100.") == 100
  assert responses.parse_score("250") is None and responses.parse_score("none") is None
