"""`jaxllm serve` under load: continuous batching over 8 slots, through the openai client."""

import http.client
import json
import string
import threading
import time

import jax
import numpy as np
import openai
import pytest

from jaxllm.config import ModelConfig
from jaxllm.data.tokenizer import CharTokenizer
from jaxllm.models.gpt import GPT, init_params
from jaxllm.serve import generate as generate_lib
from jaxllm.serve import programs
from jaxllm.serve import server as server_lib
from jaxllm.serve.engine import Engine

TOKENIZER = CharTokenizer(string.ascii_lowercase + " .,")
CONFIG = ModelConfig(vocab_size=TOKENIZER.vocab_size, context_length=64, n_layer=2, n_head=2,
                     d_model=32)
SLOTS, QUEUE = 8, 24


@pytest.fixture(scope="module")
def model_params():
  model = GPT(CONFIG)
  # At init scale a GPT's argmax repeats the last token; x10 makes it depend on the context.
  return model, jax.tree.map(lambda x: x * 10 if x.ndim >= 2 else x,
                             init_params(model, jax.random.key(1)))


@pytest.fixture(scope="module")
def served(model_params):
  model, params = model_params
  engine = Engine(model, params, TOKENIZER, slots=SLOTS, max_queue=QUEUE, buckets=(16, 64))
  background = server_lib.Background(server_lib.create_app(engine, model_name="tiny"))
  engine.warm_up()
  url = background.url
  yield openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300), url, \
      engine
  background.stop()
  engine.close()


def _texts(count, seed):
  rng = np.random.default_rng(seed)
  letters = np.array(list(string.ascii_lowercase + " "))
  return ["".join(rng.choice(letters, size=n)) for n in rng.integers(1, 60, size=count)]


def _together(calls):
  """Runs the calls at once, each on its own thread; their results in order."""
  results = [None] * len(calls)

  def run(i):
    try:
      results[i] = calls[i]()
    except Exception as e:  # noqa: BLE001 - the test looks at what each call gave
      results[i] = e

  threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  return results


def test_sixteen_concurrent_greedy_requests_equal_generate_alone(served, model_params):
  """Mixed prompt lengths, most going past the 64-token context: each is generate's output."""
  client, _, _ = served
  model, params = model_params
  prompts = _texts(16, seed=0)
  replies = _together([lambda p=p: client.completions.create(
      model="tiny", prompt=p, max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
      for p in prompts])
  # One batch of generate: the same as one at a time (tests/test_generate.py), one compile.
  expected = generate_lib.generate(model, params, [TOKENIZER.encode(p) for p in prompts], 20,
                                   temperature=0, vocab_size=TOKENIZER.vocab_size)
  for reply, ids in zip(replies, expected):
    assert reply.choices[0].text == TOKENIZER.decode(ids)
    assert reply.usage.completion_tokens == 20


def test_seeded_sampling_gives_the_same_text_among_others_as_alone(served):
  client, _, _ = served

  def sample(prompt):
    return client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=1.0,
                                     top_p=0.9, seed=11, extra_body={"ignore_eos": True}
                                     ).choices[0].text

  prompts = _texts(12, seed=1)
  alone = [sample(p) for p in prompts[:3]]
  crowded = _together([lambda p=p: sample(p) for p in prompts])
  assert crowded[:3] == alone
  assert len(set(crowded)) > 6  # different prompts, different samples


def _stream(url, body):
  """A streamed completion over a raw connection: (the connection, its response)."""
  host, port = url.removeprefix("http://").split(":")
  connection = http.client.HTTPConnection(host, int(port), timeout=300)
  connection.request("POST", "/v1/completions", json.dumps({**body, "stream": True}),
                     {"Content-Type": "application/json"})
  return connection, connection.getresponse()


def _events(response):
  for line in response:
    if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
      yield time.perf_counter(), json.loads(line[6:])


def test_a_short_request_gets_its_first_token_before_a_long_one_ends(served):
  client, url, _ = served
  long_connection, long_response = _stream(url, {"prompt": "once upon a time", "max_tokens": 400,
                                                 "ignore_eos": True, "temperature": 0})
  events = _events(long_response)
  next(events)  # the long request is decoding
  short_started = time.perf_counter()
  short = client.completions.create(model="tiny", prompt="hi", max_tokens=3, temperature=0)
  short_done = time.perf_counter()
  last = max(t for t, _ in events)
  long_connection.close()
  assert short.usage.completion_tokens == 3
  assert short_started < short_done < last  # served between the long one's tokens


def test_no_compilation_after_warm_up_over_200_requests(served):
  client, _, _ = served
  programs_ = (programs.prefill, programs.decode, programs.window)
  before = [f._cache_size() for f in programs_]
  prompts = _texts(200, seed=2)
  counts = []
  for start in range(0, 200, 20):  # 20 at a time, below the queue's bound
    counts += [r.usage.completion_tokens for r in _together([
        lambda p=p, i=i: client.completions.create(
            model="tiny", prompt=p, max_tokens=1 + i % 7, temperature=i % 3 / 2,
            extra_body={"ignore_eos": True})
        for i, p in enumerate(prompts[start:start + 20], start)])]
  assert counts == [1 + i % 7 for i in range(200)]
  assert [f._cache_size() for f in programs_] == before


def test_disconnects_malformed_bodies_and_a_burst_past_the_queue(served):
  """200 requests: 40 hang up mid-stream, 20 are malformed, the rest well formed, sent as a
  burst larger than the slots plus the queue: every well-formed request the queue took
  succeeds, those past it are told 429, and every slot is free at the end."""
  client, url, engine = served
  kinds = ["disconnect"] * 40 + ["malformed"] * 20 + ["good"] * 140
  np.random.default_rng(3).shuffle(kinds)

  def call(kind, i):
    if kind == "disconnect":
      connection, response = _stream(url, {"prompt": "abc", "max_tokens": 200,
                                           "ignore_eos": True})
      response.readline()
      connection.close()
      return "disconnected"
    if kind == "malformed":
      host, port = url.removeprefix("http://").split(":")
      connection = http.client.HTTPConnection(host, int(port), timeout=60)
      connection.request("POST", "/v1/completions", b'{"prompt": "abc", "max_tokens": ',
                         {"Content-Type": "application/json"})
      status = connection.getresponse().status
      connection.close()
      return status
    try:
      return client.completions.create(model="tiny", prompt="request " + "abc"[i % 3] * (i % 40),
                                       max_tokens=4, temperature=0,
                                       extra_body={"ignore_eos": True}).usage.completion_tokens
    except openai.RateLimitError:
      return 429

  results = _together([lambda k=k, i=i: call(k, i) for i, k in enumerate(kinds)])
  good = [r for k, r in zip(kinds, results) if k == "good"]
  assert [r for k, r in zip(kinds, results) if k == "malformed"] == [400] * 20
  assert set(good) <= {4, 429}  # served whole, or refused with 429: nothing else
  assert good.count(4) >= SLOTS + QUEUE  # at least what the slots and the queue hold
  deadline = time.time() + 60
  while engine.stats()["running"] + engine.stats()["waiting"] and time.time() < deadline:
    time.sleep(0.05)
  assert engine.stats() == {"slots": SLOTS, "running": 0, "waiting": 0}
  assert engine.is_running()
