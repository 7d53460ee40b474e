"""The serving engine: continuous batching gives each request what `generate` gives it alone."""

import json
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.config import ModelConfig
from jaxllm.data.tokenizer import CharTokenizer
from jaxllm.errors import JaxllmError
from jaxllm.models.gpt import GPT, init_params
from jaxllm.serve import generate as generate_lib
from jaxllm.serve import programs
from jaxllm.serve import requests as requests_lib
from jaxllm.serve.engine import Engine, QueueFull, Sampling

CHARS = "abcdefghijklmnopqrstuvwxyz .,;:!?'\n"
CONFIG = ModelConfig(vocab_size=40, context_length=32, n_layer=2, n_head=2, d_model=32)
GREEDY = Sampling(max_tokens=24, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_params():
  model = GPT(CONFIG)
  # At init scale a GPT's argmax repeats the last token; x10 makes it depend on the context.
  return model, jax.tree.map(lambda x: x * 10 if x.ndim >= 2 else x,
                             init_params(model, jax.random.key(0)))


@pytest.fixture(scope="module")
def tokenizer():
  return CharTokenizer(CHARS)  # 35 characters + end-of-text: ids 36..39 are padding


@pytest.fixture(scope="module")
def engine(model_params, tokenizer):
  model, params = model_params
  engine = Engine(model, params, tokenizer, slots=3, max_queue=16, buckets=(8, 16, 32)).start()
  yield engine
  engine.close()


def _prompts(count, seed=0):
  rng = np.random.default_rng(seed)
  return [list(map(int, rng.integers(0, len(CHARS), size=n)))
          for n in rng.integers(1, CONFIG.context_length + 1, size=count)]


def _all_at_once(engine, prompts, sampling):
  """Submits every prompt before the first is done; their results in order."""
  results, threads = [None] * len(prompts), []
  for i, prompt in enumerate(prompts):
    def run(i=i, prompt=prompt):
      results[i] = engine.complete(prompt, sampling, timeout=120)
    threads.append(threading.Thread(target=run))
    threads[-1].start()
  for thread in threads:
    thread.join()
  return results


def test_greedy_requests_decoded_together_equal_generate_alone(engine, model_params, tokenizer):
  """Seven requests on three slots, joining and leaving between steps, prompts up to the
  context length (so most go past it): each is what `generate` gives it alone."""
  model, params = model_params
  prompts = _prompts(7)
  assert max(map(len, prompts)) + GREEDY.max_tokens > CONFIG.context_length
  results = _all_at_once(engine, prompts, GREEDY)
  # One batch of generate: the same as one at a time (tests/test_generate.py), one compile.
  expected = generate_lib.generate(model, params, prompts, GREEDY.max_tokens, temperature=0,
                                   vocab_size=tokenizer.vocab_size)
  for prompt, result, alone in zip(prompts, results, expected):
    assert result.token_ids == alone
    assert result.text == tokenizer.decode(alone)
    assert (result.finish_reason, result.prompt_tokens, result.completion_tokens) == (
        "length", len(prompt), GREEDY.max_tokens)


def test_a_seeded_sample_does_not_depend_on_the_batch(engine):
  sampling = Sampling(max_tokens=12, temperature=1.0, top_k=8, top_p=0.9, seed=7)
  prompt = _prompts(1, seed=3)[0]
  alone = engine.complete(prompt, sampling, timeout=60).token_ids
  crowded = _all_at_once(engine, [prompt] + _prompts(4, seed=4),
                         sampling)[0].token_ids
  other_seed = engine.complete(prompt, Sampling(**{**sampling.__dict__, "seed": 8}),
                               timeout=60).token_ids
  assert alone == crowded
  assert alone != other_seed


def test_sample_rows_keeps_to_top_k_and_the_nucleus():
  logits_V = jnp.array([3.0, 2.9, 2.8, 0.0, -1.0, -2.0, 2.85, 1.0])
  order = np.argsort(-np.asarray(logits_V))
  probs = np.sort(np.asarray(jax.nn.softmax(logits_V)))[::-1]
  nucleus = order[:int(np.searchsorted(np.cumsum(probs), 0.5) + 1)]
  rows = 400
  seeds = jnp.arange(rows, dtype=jnp.uint32)
  for top_k, top_p, allowed in ((3, 1.0, order[:3]), (0, 0.5, nucleus), (1, 1.0, order[:1])):
    tokens, *_ = programs.sample_rows(
        jnp.tile(logits_V, (rows, 1)), seeds, jnp.zeros(rows, jnp.int32),
        jnp.ones(rows), jnp.full(rows, top_k), jnp.full(rows, top_p), 0)
    assert set(np.asarray(tokens).tolist()) == set(allowed.tolist()), (top_k, top_p)
  greedy, *_ = programs.sample_rows(logits_V[None], seeds[:1], jnp.zeros(1, jnp.int32),
                                      jnp.zeros(1), jnp.zeros(1, jnp.int32), jnp.ones(1), 0)
  assert int(greedy[0]) == 0


def _log_softmax_of(model, params, ids):
  """The model's next-token logprobs at every position of `ids`, from a full forward pass."""
  return np.asarray(jax.nn.log_softmax(model.apply({"params": params}, jnp.array([ids]))[0], -1))


def test_logprobs_are_the_models(engine, model_params, tokenizer):
  model, params = model_params
  prompt = _prompts(1, seed=5)[0][:10]
  result = engine.complete(prompt, Sampling(max_tokens=6, temperature=0, logprobs=3,
                                            ignore_eos=True), timeout=60)
  full = _log_softmax_of(model, params, prompt + result.token_ids)[:, :tokenizer.vocab_size]
  full = full - np.log(np.exp(full).sum(-1, keepdims=True))  # renormalised without padding ids
  for i, (token, logprob, top) in enumerate(zip(result.token_ids, result.logprobs,
                                                result.top_logprobs)):
    row = full[len(prompt) - 1 + i]
    assert abs(logprob - row[token]) < 1e-5
    assert [t for t, _ in top] == list(np.argsort(-row)[:3])
    np.testing.assert_allclose([lp for _, lp in top], np.sort(row)[::-1][:3], atol=1e-5)

  logprobs, tops = engine.prompt_logprobs(prompt, top=2)
  assert logprobs[0] is None and tops[0] == []
  for i in range(1, len(prompt)):
    assert abs(logprobs[i] - full[i - 1][prompt[i]]) < 1e-5
    assert [t for t, _ in tops[i]] == list(np.argsort(-full[i - 1])[:2])


def test_a_stop_string_ends_the_text_before_it(engine, tokenizer):
  prompt = _prompts(1, seed=6)[0][:8]
  text = engine.complete(prompt, GREEDY, timeout=60).text
  stop = text[9:12]
  cut = text.find(stop)
  result = engine.complete(prompt, Sampling(**{**GREEDY.__dict__, "stop": (stop, "\x00")}),
                           timeout=60)
  assert (result.text, result.finish_reason) == (text[:cut], "stop")
  assert result.completion_tokens == len(tokenizer.encode(text[:cut + len(stop)]))


def test_a_streamed_request_never_shows_the_start_of_a_stop_string(engine):
  prompt = _prompts(1, seed=6)[0][:8]
  text = engine.complete(prompt, GREEDY, timeout=60).text
  stop = text[9:12] + "\x00"  # starts as the text goes on, never completes
  parts, done = [], threading.Event()
  engine.submit(prompt, Sampling(**{**GREEDY.__dict__, "stop": (stop,)}),
                lambda d: (parts.append(d.text), d.finish_reason and done.set()))
  assert done.wait(60)
  assert "".join(parts) == text
  shown = [len("".join(parts[:i + 1])) for i in range(len(parts))]
  assert 12 not in shown[:-1]  # the text up to the end of text[9:12] came out only at the end
  assert requests_lib.held_back("abc\ufffd", ()) == 1
  assert requests_lib.held_back("xyzab", ("abc", "bq")) == 2


def test_end_of_text_stops_a_request(model_params, tokenizer):
  """With end-of-text made the token greedy decoding emits fourth, a request ends there."""
  model, params = model_params
  prompt = _prompts(1, seed=8)[0][:5]
  plain = Engine(model, params, tokenizer, slots=1, buckets=(32,)).start()
  tokens = plain.complete(prompt, GREEDY, timeout=60).token_ids
  plain.close()
  marked = CharTokenizer(CHARS)
  marked.eot_id = tokens[3]
  engine = Engine(model, params, marked, slots=1, buckets=(32,)).start()
  result = engine.complete(prompt, Sampling(max_tokens=24, temperature=0), timeout=60)
  engine.close()
  first = tokens.index(tokens[3])
  assert result.token_ids == tokens[:first + 1]
  assert (result.finish_reason, result.completion_tokens) == ("stop", first + 1)
  assert result.text == marked.decode(tokens[:first])


def test_warm_up_compiles_every_program_once(model_params, tokenizer):
  model, params = model_params
  engine = Engine(model, params, tokenizer, slots=2, buckets=(8, 16, 32)).start()
  engine.warm_up()
  sizes = [f._cache_size() for f in (programs.prefill, programs.decode,
                                     programs.window)]
  _all_at_once(engine, _prompts(5, seed=9), GREEDY)
  assert [f._cache_size() for f in (programs.prefill, programs.decode,
                                    programs.window)] == sizes
  engine.close()


def test_bad_requests_and_a_full_queue_are_refused(model_params, tokenizer):
  model, params = model_params
  engine = Engine(model, params, tokenizer, slots=1, max_queue=1, buckets=(32,))
  with pytest.raises(JaxllmError, match="more than the model's context length 32"):
    engine.submit([1] * 33, GREEDY, print)
  with pytest.raises(JaxllmError, match="outside"):
    engine.submit([39], GREEDY, print)
  with pytest.raises(JaxllmError, match="top_p"):
    engine.submit([1], Sampling(top_p=0), print)
  with pytest.raises(JaxllmError, match="seed must be in"):
    engine.submit([1], Sampling(seed=2**32), print)
  # Not started: one request takes the free slot's place, one waits, the next is refused.
  engine.submit([1], GREEDY, lambda d: None)
  engine.submit([1], GREEDY, lambda d: None)
  with pytest.raises(QueueFull, match="max-queue 1"):
    engine.submit([1], GREEDY, print)
  engine.close()


def test_a_failing_callback_cancels_its_request_alone(engine, capsys):
  def broken(delta):
    raise RuntimeError("the client went away")

  engine.submit([1, 2], GREEDY, broken)
  assert engine.complete([3, 4], Sampling(max_tokens=3, temperature=0, ignore_eos=True),
                         timeout=60).completion_tokens == 3
  assert "a request's callback failed (RuntimeError: the client went away)" in (
      capsys.readouterr().err)
  assert engine.is_running()


def test_counters_follow_the_requests(model_params, tokenizer):
  model, params = model_params
  engine = Engine(model, params, tokenizer, slots=2, buckets=(32,)).start()
  results = _all_at_once(engine, _prompts(3, seed=10), Sampling(max_tokens=5, temperature=0,
                                                                 ignore_eos=True))
  engine.close()
  value = engine.registry.get_sample_value
  assert value("jaxllm_generation_tokens_total") == sum(r.completion_tokens for r in results)
  assert value("jaxllm_prompt_tokens_total") == sum(r.prompt_tokens for r in results)
  assert value("jaxllm_time_to_first_token_seconds_count") == 3
  assert value("jaxllm_time_per_output_token_seconds_count") == 3 * 4
  assert value("jaxllm_requests_finished_total", {"finish_reason": "length"}) == 3
  assert value("jaxllm_requests_running") == 0


MESH_SCRIPT = """
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import json, sys
import jax, ml_collections
from jaxllm.config import ModelConfig
from jaxllm.data.tokenizer import CharTokenizer
from jaxllm.errors import JaxllmError
from jaxllm.models.gpt import GPT, init_params
from jaxllm.serve.engine import Engine, Sampling
from jaxllm.training import sharding

model = GPT(ModelConfig(vocab_size=40, context_length=32, n_layer=2, n_head=4, d_model=32))
params = jax.tree.map(lambda x: x * 10 if x.ndim >= 2 else x, init_params(model, jax.random.key(0)))
tokenizer = CharTokenizer(sys.argv[1])
prompts = [[1, 2, 3], list(range(20)), [5] * 30, [7] * 9]
sampling = Sampling(max_tokens=10, temperature=0, ignore_eos=True)
out = {}
meshes = {}
for name, sizes in (("one", (1, 1, 1)), ("mesh", (2, 2, 2)), ("tensor4", (1, 1, 4))):
  devices = jax.devices()[:sizes[0] * sizes[1] * sizes[2]]
  mesh = meshes[name] = sharding.make_mesh(ml_collections.ConfigDict(dict(zip(
      ("data", "fsdp", "tensor"), sizes))), devices)
  engine = Engine(model, params, tokenizer, slots=4, buckets=(32,), mesh=mesh,
                  rules=sharding.logical_rules([])).start()
  out[name] = [engine.complete(p, sampling, timeout=120).token_ids for p in prompts]
  out[name + "_spec"] = str(jax.tree.leaves(engine._cache)[0].sharding.spec)
  engine.close()
try:
  Engine(model, params, tokenizer, slots=3, mesh=meshes["mesh"], rules=sharding.logical_rules([]))
except JaxllmError as e:
  out["error"] = str(e)
print(json.dumps(out))
"""


def test_on_a_mesh_of_8_devices_the_outputs_are_the_one_device_ones(tmp_path):
  """Parameters and cache sharded as training shards them (meshes (2, 2, 2): data, fsdp and
  tensor 2; (1, 1, 4): tensor 4; of simulated CPU devices): the one-device greedy tokens."""
  script = tmp_path / "mesh.py"
  script.write_text(MESH_SCRIPT)
  result = subprocess.run([sys.executable, str(script), CHARS], capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert out["one"] == out["mesh"] == out["tensor4"]
  assert len(set(map(tuple, out["one"]))) == 4  # four prompts, four continuations
  assert out["mesh_spec"] == "P(('data', 'fsdp'), None, 'tensor')"  # slots, positions, kv heads
  assert out["error"] == ("--slots 3 does not split over the mesh's batch axes (4 ways); use a "
                          "multiple of 4")
