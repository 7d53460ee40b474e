"""lm-evaluation-harness in-process (jaxllm/eval/harness.py): its figures against jaxllm's own
forward pass and generation computed directly, in fixed shapes, and `jaxllm eval --tasks` on
task YAMLs of local JSON files. Skips without the eval extra (fails under CI=true)."""

import functools
import json
import math
import os
import random
import string
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

try:
  import lm_eval
  import lm_eval.tasks
except ImportError:
  if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
    raise  # CI installs the eval extra (scripts/setup.sh): its absence is a failure there
  pytest.skip("lm-evaluation-harness is not installed (pip install -e .[eval])",
              allow_module_level=True)

from jaxllm import cli  # noqa: E402
from jaxllm.config import default_config  # noqa: E402
from jaxllm.data.tokenizer import CharTokenizer  # noqa: E402
from jaxllm.errors import JaxllmError  # noqa: E402
from jaxllm.eval import harness, scoring  # noqa: E402
from jaxllm.models.gpt import init_params  # noqa: E402
from jaxllm.serve import generate as generate_lib  # noqa: E402
from jaxllm.training import rundir  # noqa: E402

TOKENIZER = CharTokenizer(string.ascii_letters + string.digits + " .,:;!?'-+=\n")
CONTEXT = 32


def _config():
  config = default_config()
  for key, value in dict(n_layer=2, n_head=2, d_model=32, context_length=CONTEXT).items():
    config.model[key] = value
  return config


@pytest.fixture(scope="module")
def model_params():
  model = rundir.build_model(rundir.resolve_model(_config().model, TOKENIZER))
  # At init scale a GPT's argmax repeats the last token; x10 makes it depend on the context.
  params = jax.jit(init_params, static_argnums=0)(model, jax.random.key(0))
  return model, jax.tree.map(lambda x: x * 10 if x.ndim >= 2 else x, params)


@pytest.fixture(scope="module")
def lm(model_params):
  return harness.JaxllmLM(*model_params, TOKENIZER, batch_size=4)


def _requests(*args_list):
  return [types.SimpleNamespace(args=args) for args in args_list]


@functools.lru_cache(maxsize=4)
def _forward(model):
  """jaxllm's own full forward pass (GPT.__call__), jitted: logits of one row."""
  return jax.jit(lambda params, tokens_1xL: model.apply({"params": params}, tokens_1xL)[0])


def _logits(model, params, tokens: list[int]) -> np.ndarray:
  """Logits of `tokens` from the full forward pass over them padded on the right to the
  context length (one compile; causal attention keeps the padding out of every real
  position, which the first test checks against unpadded passes)."""
  padded = np.zeros((1, CONTEXT), np.int32)
  padded[0, :len(tokens)] = tokens
  return np.asarray(_forward(model)(params, jnp.asarray(padded)), np.float64)[:len(tokens)]


def _direct(model, params, context: list[int], continuation: list[int]) -> tuple[float, bool]:
  """(sum of log-softmax over the continuation, all argmax) from the full forward pass over
  context + continuation, cut from the left to the context length + 1."""
  whole = (context + continuation)[-(CONTEXT + 1):]
  logits_LxV = _logits(model, params, whole[:-1])
  top_Lx1 = logits_LxV.max(-1, keepdims=True)
  logp_LxV = logits_LxV - top_Lx1 - np.log(np.exp(logits_LxV - top_Lx1).sum(-1, keepdims=True))
  positions = range(len(whole) - 1 - len(continuation), len(whole) - 1)
  return (sum(logp_LxV[p, whole[p + 1]] for p in positions),
          all(int(np.argmax(logits_LxV[p])) == whole[p + 1] for p in positions))


def _direct_strings(model, params, context: str, continuation: str) -> tuple[float, bool]:
  """As lm_eval's TemplateLM tokenizes a pair: an empty context is the end-of-text token,
  and a context's trailing spaces begin the continuation."""
  spaces = len(context) - len(context.rstrip())
  if spaces:
    context, continuation = context[:-spaces], context[-spaces:] + continuation
  context_ids = TOKENIZER.encode(context) if context else [TOKENIZER.eot_id]
  return _direct(model, params, context_ids, TOKENIZER.encode(continuation))


def _greedy(model, params, text: str, new: int) -> str:
  """`new` characters of argmax after `text`, from the full forward pass."""
  tokens = TOKENIZER.encode(text)
  for _ in range(new):
    tokens.append(int(np.argmax(_logits(model, params, tokens)[-1])))
  return TOKENIZER.decode(tokens[-new:])


def _rolling_direct(model, params, text):
  """Windows by hand: up to CONTEXT new tokens each, every one seeing the CONTEXT tokens
  before it (the first after the end-of-text token)."""
  tokens = TOKENIZER.encode(text)
  sequence, total, start = [TOKENIZER.eot_id] + tokens, 0.0, 0
  while start < len(tokens):
    end = min(start + CONTEXT, len(tokens))
    window = sequence[max(0, end - CONTEXT):end + 1]
    total += _direct(model, params, window[:-(end - start)], window[-(end - start):])[0]
    start = end
  return total


def test_loglikelihoods_equal_the_direct_forward_pass_at_every_batch_size(model_params, lm):
  model, params = model_params
  context = "The cat sat on"
  greedy = _greedy(model, params, context, 6)
  wrong = greedy[:-1] + ("a" if greedy[-1] != "a" else "b")
  pairs = [(context, " the mat"), ("", "hello"), ("x" * 50 + " and then", " more words"),
           (context, greedy), (context, wrong), ("Hi", "!"), ("Hi ", "there"),
           ("A longer context of words", " yes")]
  results = lm.loglikelihood(_requests(*pairs))
  expected = [_direct_strings(model, params, *pair) for pair in pairs]
  np.testing.assert_allclose([r[0] for r in results], [e[0] for e in expected], rtol=0,
                             atol=1e-5)
  assert [r[1] for r in results] == [e[1] for e in expected]
  assert results[3][1] and not results[4][1]  # the model's own greedy text, and one char off
  assert all(isinstance(r[0], float) and isinstance(r[1], bool) for r in results)

  # Other batch sizes (the last batch padded with empty rows), requests shuffled: the same
  # figures, in request order.
  order = list(range(len(pairs)))
  random.Random(0).shuffle(order)
  one = harness.JaxllmLM(model, params, TOKENIZER, batch_size=1)
  shuffled = one.loglikelihood(_requests(*[pairs[i] for i in order]))
  np.testing.assert_allclose([s[0] for s in shuffled], [results[i][0] for i in order], rtol=0,
                             atol=1e-5)
  assert [s[1] for s in shuffled] == [results[i][1] for i in order]

  # The reference's right padding changes no real position's logits: unpadded passes agree.
  for text in ("The cat sat on the mat", "Hi"):
    tokens = TOKENIZER.encode(text)
    unpadded = _forward(model)(params, jnp.asarray([tokens]))
    np.testing.assert_allclose(_logits(model, params, tokens), unpadded, rtol=0, atol=1e-5)


def test_rolling_loglikelihood_sums_disjoint_windows_over_every_token(model_params, lm):
  model, params = model_params
  text = "It was the best of times, it was the worst of times; it was the age of wisdom."
  tokens = TOKENIZER.encode(text)
  assert len(tokens) > 2 * CONTEXT
  total = _rolling_direct(model, params, text)
  (rolled, count), = lm.rolling_loglikelihoods([text])
  assert count == len(tokens)
  np.testing.assert_allclose(rolled, total, rtol=0, atol=1e-4)
  short = "Short."
  results = lm.loglikelihood_rolling(_requests((text,), (short,)))
  np.testing.assert_allclose(results, [total, _direct_strings(model, params, "", short)[0]],
                             rtol=0, atol=1e-4)


def test_generate_until_stops_at_its_string_and_is_jaxllms_greedy_text(model_params, lm):
  model, params = model_params
  contexts = ["The cat", "Once upon a", "x" * 40 + "Tail end"]
  max_new = 12
  kept = CONTEXT - max_new  # the context cut from the left to leave room for the new tokens
  full = generate_lib.generate_text(model, params, TOKENIZER, [c[-kept:] for c in contexts],
                                    max_new, temperature=0)
  assert all(len(text) == max_new for text in full), full  # no end-of-text in 12 tokens here
  stop = full[0][5:7]  # two characters the first completion holds: it stops before them
  got = lm.generate_until(_requests(
      *[(c, {"until": [stop], "max_gen_toks": max_new, "do_sample": False}) for c in contexts]))
  assert got == [text.split(stop)[0] for text in full]
  assert len(got[0]) == 5
  # Without a stop string (only the end-of-text's), the whole greedy completion.
  assert lm.generate_until(_requests((contexts[2], {"until": [], "max_gen_toks": max_new}))) == [
      full[2]]


def test_one_compile_per_bucket(model_params):
  model, params = model_params
  lm = harness.JaxllmLM(model, params, TOKENIZER, batch_size=2)
  assert lm.buckets == (16, CONTEXT) == scoring.bucket_lengths(CONTEXT)
  assert scoring.bucket_lengths(100) == (16, 32, 64, 100)
  assert scoring.bucket_lengths(2048) == (16, 32, 64, 128, 256, 512, 1024, 2048)
  pairs = [("a" * n, " b") for n in range(1, 40, 3)]  # 13 lengths, both buckets
  lm.loglikelihood(_requests(*pairs))
  assert lm.devices.shapes == {("score", 2, 16), ("score", 2, CONTEXT)}
  compiled = lm.devices._score._cache_size()
  assert compiled == 2
  lm.loglikelihood(_requests(*[("b" * n, " cc") for n in range(2, 30, 5)]))
  lm.loglikelihood_rolling(_requests(("word " * 30,)))
  assert lm.devices._score._cache_size() == compiled


class _Catalog:
  """A stand-in for lm_eval's TaskManager over its whole catalog (seconds to index)."""

  def __init__(self, include_path=None, include_defaults=True):
    self.all_tasks = ["hellaswag"] if include_defaults else []


def test_errors_are_one_line(tmp_path, model_params, lm, capsys, monkeypatch):
  with pytest.raises(JaxllmError, match="continuation of 40 tokens"):
    lm.loglikelihood(_requests(("a", "b" * 40)))
  monkeypatch.setattr(lm_eval.tasks, "TaskManager", _Catalog)
  with pytest.raises(JaxllmError, match="unknown lm-evaluation-harness tasks nope, nix "):
    harness.task_manager(["hellaswag", "nope", "nix"], tmp_path)
  with pytest.raises(JaxllmError, match="--include-path .* is not a folder"):
    harness.task_manager(["nope"], tmp_path / "missing")
  model, params = model_params
  workdir = rundir.write_run(tmp_path / "run", _config(), params, TOKENIZER.to_json())
  assert cli.main(["eval", "--workdir", str(workdir), "--limit", "3"]) == 2
  assert "--limit goes with --tasks" in capsys.readouterr().err
  assert cli.main(["eval", "--workdir", str(workdir), "--tasks", "x", "--text", "f"]) == 2
  assert "give one of them" in capsys.readouterr().err
  assert cli.main(["eval", "--workdir", str(workdir), "--tasks", "x",
                   "--config.train.steps=3"]) == 2
  assert "has no effect on `jaxllm eval --tasks`" in capsys.readouterr().err


QUESTIONS = [  # (question, choices, answer): ten multiple-choice documents
    ("2 + 2 =", ["4", "5", "22"], 0), ("The sky is", ["green", "blue"], 1),
    ("Cats say", ["meow", "woof", "moo"], 0), ("Ice is", ["hot", "cold"], 1),
    ("One, two,", ["three", "four"], 0), ("Snow is", ["black", "white"], 1),
    ("A, B,", ["C", "D", "E"], 0), ("Fire is", ["wet", "hot"], 1),
    ("Birds can", ["fly", "swim", "dig"], 0), ("The sun is", ["a planet", "a star"], 1),
]
GENERATE = ["The cat", "Once upon a time", "Hi", "Snow is white"]  # prompts of tiny_gen
TEXTS = ["Tiny text.", "A text longer than the context of the model, so that it takes more "
         "than one window: every token is scored once.", "Another short one, with words."]


def _write_tasks(folder, answers):
  folder.mkdir()
  with open(folder / "gen.jsonl", "w") as f:
    for prompt, answer in zip(GENERATE, answers):
      f.write(json.dumps({"prompt": prompt, "answer": answer}) + "\n")
  with open(folder / "mc.jsonl", "w") as f:
    for question, choices, answer in QUESTIONS:
      f.write(json.dumps({"question": question, "choices": choices, "answer": answer}) + "\n")
  with open(folder / "texts.jsonl", "w") as f:
    for text in TEXTS:
      f.write(json.dumps({"text": text}) + "\n")
  (folder / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / "mc.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
  (folder / "tiny_ppl.yaml").write_text(f"""task: tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / "texts.jsonl"}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""")
  (folder / "tiny_gen.yaml").write_text(f"""task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / "gen.jsonl"}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
""")


def test_jaxllm_eval_runs_local_tasks_and_writes_their_results(tmp_path, model_params, capsys):
  model, params = model_params
  workdir = rundir.write_run(tmp_path / "run", _config(), params, TOKENIZER.to_json())
  # tiny_gen's answers: jaxllm's greedy completions up to the task's stop string "." for half
  # the prompts, something else for the others: exact_match must be 1/2.
  completions = [text.split(".")[0] for text in generate_lib.generate_text(
      model, params, TOKENIZER, GENERATE, 8, temperature=0)]
  _write_tasks(tmp_path / "tasks", completions[:2] + [c + "!" for c in completions[2:]])
  tasks = ["eval", "--workdir", str(workdir), "--tasks", "tiny_mc,tiny_ppl,tiny_gen",
           "--include-path", str(tmp_path / "tasks"), "--batch-size", "4", "--no-progress"]
  assert cli.main(tasks) == 0
  out = capsys.readouterr().out
  assert "|tiny_mc" in out and "|tiny_ppl" in out and "results in" in out
  results = json.loads((workdir / "lm_eval" / "results.json").read_text())
  assert results["results"]["tiny_gen"]["exact_match,none"] == 0.5

  # Accuracy: each document's choice of highest loglikelihood (" " + choice after the
  # question, the harness's target delimiter), computed directly.
  right = [int(np.argmax([_direct_strings(model, params, q, " " + c)[0] for c in choices]))
           == answer for q, choices, answer in QUESTIONS]
  acc = results["results"]["tiny_mc"]["acc,none"]
  assert 0 <= acc <= 1
  assert acc == pytest.approx(np.mean(right), abs=1e-12)
  assert results["n-samples"]["tiny_mc"]["effective"] == len(QUESTIONS)

  # Perplexities: the texts' rolling loglikelihoods over their bytes and words.
  total = sum(_rolling_direct(model, params, text) for text in TEXTS)
  size = sum(len(text.encode()) for text in TEXTS)
  words = sum(len(text.split()) for text in TEXTS)
  figures = results["results"]["tiny_ppl"]
  assert figures["byte_perplexity,none"] == pytest.approx(math.exp(-total / size), rel=1e-5)
  assert figures["bits_per_byte,none"] == pytest.approx(-total / size / math.log(2), rel=1e-5)
  assert figures["word_perplexity,none"] == pytest.approx(math.exp(-total / words), rel=1e-4)
  assert results["config"]["bootstrap_iters"] == 0
  shapes = sorted(map(tuple, results["config"]["compiled_shapes"]))
  assert shapes == [("generate", 4, 16, 8, 0.0, 0, 1.0), ("score", 4, 16), ("score", 4, 32)]

  # Two processes of one device each, the batch rows split between them (mesh.data=2):
  # process 0 runs the harness, both run every batch. The same figures.
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAXLLM_COORDINATOR")}
  subprocess.run([sys.executable, "-m", "jaxllm.cli", "launch", "local", "--processes", "2",
                  "--", *tasks, "--config.mesh.data=2"], cwd=tmp_path, check=True,
                 env={**env, "JAX_PLATFORMS": "cpu"}, capture_output=True, timeout=300)
  two = json.loads((workdir / "lm_eval" / "results.json").read_text())
  assert two["config"]["mesh"] == {"data": 2, "fsdp": 1, "tensor": 1}
  for task, figures in results["results"].items():
    for name, value in figures.items():
      if isinstance(value, float):
        assert two["results"][task][name] == pytest.approx(value, rel=1e-5), (task, name)


def test_without_the_extra_one_line_names_it(tmp_path, monkeypatch, capsys):
  import jaxllm.eval

  monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` fails
  monkeypatch.delitem(sys.modules, "jaxllm.eval.harness")
  monkeypatch.delattr(jaxllm.eval, "harness")
  assert cli.main(["eval", "--workdir", str(tmp_path), "--tasks", "hellaswag"]) == 2
  assert capsys.readouterr().err == ("jaxllm: error: lm-evaluation-harness is not installed; "
                                     "install jaxllm's eval extra: pip install -e .[eval]\n")
