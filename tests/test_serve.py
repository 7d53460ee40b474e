"""`jaxllm serve`: the official openai client against a real uvicorn server on 127.0.0.1, over
the engine of a tiny random GPT with a character tokenizer. Answers are checked against
`generate`, the model's own log-softmax and the engine itself."""

import http.client
import json
import string
import threading
import time
import urllib.error
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
import openai
import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from jaxllm import cli
from jaxllm.config import ModelConfig, default_config
from jaxllm.data.tokenizer import CharTokenizer
from jaxllm.errors import JaxllmError
from jaxllm.models.gpt import GPT, init_params
from jaxllm.serve import chat
from jaxllm.serve import generate as generate_lib
from jaxllm.serve import server as server_lib
from jaxllm.serve.engine import Engine, Sampling
from jaxllm.training import rundir

TOKENIZER = CharTokenizer(string.ascii_letters + string.digits + " .,:;!?#<>|_'-\n")
CONFIG = ModelConfig(vocab_size=TOKENIZER.vocab_size, context_length=512, n_layer=2, n_head=2,
                     d_model=32)
BUCKETS = (64, 512)  # two prefill programs to compile, not five
CHATML = ("{{ bos_token }}{% for message in messages %}"
          "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
          "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
          "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


class SwitchableTemplate:
  """A chat template tests can swap while the one server runs."""

  def __init__(self, template):
    self.template = template

  def __call__(self, messages):
    return self.template(messages)

  @property
  def stop(self):
    return self.template.stop


@pytest.fixture(scope="module")
def model_params():
  model = GPT(CONFIG)
  # At init scale a GPT's argmax repeats the last token; x10 makes it depend on the context.
  return model, jax.tree.map(lambda x: x * 10 if x.ndim >= 2 else x,
                             init_params(model, jax.random.key(0)))


def _start(app):
  """A uvicorn server for `app` on a free port of 127.0.0.1, in a thread."""
  background = server_lib.Background(app)
  return background, None, background.url


def _stop(background, thread=None):
  background.stop()


@pytest.fixture(scope="module")
def served(model_params):
  model, params = model_params
  engine = Engine(model, params, TOKENIZER, slots=4, max_queue=16, buckets=BUCKETS)
  template = SwitchableTemplate(chat.instruction_template("alpaca"))
  server, thread, url = _start(server_lib.create_app(engine, model_name="tiny",
                                                     chat_template=template))
  client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
  yield client, url, engine, template
  _stop(server, thread)
  engine.close()


def _greedy(client, prompt, max_tokens, **extra):
  return client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens,
                                   temperature=0, **extra)


def _log_softmax(model_params, ids):
  model, params = model_params
  logits = model.apply({"params": params}, jnp.asarray([ids]))[0]
  return np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))


def _post(url, path, body):
  request = urllib.request.Request(url + path, json.dumps(body).encode(),
                                   {"Content-Type": "application/json"})
  with urllib.request.urlopen(request) as response:
    return response.read().decode()


def test_models_lists_the_served_name(served):
  client, *_ = served
  models = client.models.list()
  assert [m.id for m in models.data] == ["tiny"]
  assert models.data[0].owned_by == "jaxllm"


def test_greedy_completion_is_generate_and_logprobs_the_models(served, model_params):
  client, *_ = served
  model, params = model_params
  prompt = "The quick brown fox"
  reply = _greedy(client, prompt, 12, logprobs=1)
  assert reply.choices[0].text == generate_lib.generate_text(model, params, TOKENIZER, prompt, 12,
                                                             temperature=0)
  ids = TOKENIZER.encode(prompt + reply.choices[0].text)
  expected = _log_softmax(model_params, ids)[np.arange(len(prompt) - 1, len(ids) - 1),
                                             ids[len(prompt):]]
  np.testing.assert_allclose(reply.choices[0].logprobs.token_logprobs, expected, atol=1e-5)


def test_usage_finish_reason_and_max_tokens(served):
  client, *_ = served
  prompt = "Hello there"
  reply = _greedy(client, prompt, 7)
  choice = reply.choices[0]
  assert (choice.finish_reason, len(TOKENIZER.encode(choice.text))) == ("length", 7)
  assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (
      len(TOKENIZER.encode(prompt)), 7, len(prompt) + 7)
  assert reply.id.startswith("cmpl-") and reply.object == "text_completion"
  assert reply.model == "tiny" and reply.created > 0
  # Token ids are prompts too; a list of prompts gives one choice each, in order.
  both = _greedy(client, [TOKENIZER.encode(prompt), TOKENIZER.encode("Bye")], 7)
  assert [c.index for c in both.choices] == [0, 1]
  assert both.choices[0].text == choice.text
  assert both.usage.prompt_tokens == len(prompt) + 3


def test_concurrent_requests_each_get_their_solo_answer(served):
  client, *_ = served
  prompts = ["a", "Once upon a time", "0123456789", "What is it?", "zz top", "Q: why\nA:"]
  alone = [_greedy(client, p, 10).choices[0].text for p in prompts]
  together = [None] * len(prompts)

  def ask(i):
    together[i] = _greedy(client, prompts[i], 10).choices[0].text

  threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  assert together == alone
  assert len(set(alone)) > 1


def test_a_stream_is_the_same_text_and_ends_with_done(served):
  client, url, *_ = served
  prompt, whole = "Streaming works", _greedy(client, "Streaming works", 9)
  chunks = list(_greedy(client, prompt, 9, stream=True, stream_options={"include_usage": True}))
  assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
  assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
  assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 9
  assert all(c.usage is None for c in chunks[:-1])
  raw = _post(url, "/v1/completions", {"prompt": prompt, "max_tokens": 9, "temperature": 0,
                                       "stream": True})
  events = raw.split("\n\n")
  assert events[-2:] == ["data: [DONE]", ""] and all(e.startswith("data: ") for e in events[:-1])
  texts = [json.loads(e[len("data: "):])["choices"][0]["text"] for e in events[:-2]]
  assert "".join(texts) == whole.choices[0].text


def test_a_stop_string_cuts_the_text_before_it(served):
  client, *_ = served
  text = _greedy(client, "Stop me", 16).choices[0].text
  stop = text[6:8]
  reply = _greedy(client, "Stop me", 16, stop=["#never#", stop])
  assert reply.choices[0].text == text[:text.find(stop)]
  assert reply.choices[0].finish_reason == "stop"
  streamed = _greedy(client, "Stop me", 16, stop=stop, stream=True)
  assert "".join(c.choices[0].text for c in streamed) == text[:text.find(stop)]


def test_n_choices_with_a_seed_differ_and_are_reproducible(served):
  client, *_ = served

  def sample(seed, prompt="Roll the dice"):
    reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, n=3,
                                      seed=seed, temperature=1.0)
    return [c.text for c in sorted(reply.choices, key=lambda c: c.index)]

  first = sample(7)
  assert first == sample(7) and len(set(first)) == 3
  assert first != sample(8)
  two = client.completions.create(model="tiny", prompt=["Roll the dice", "Roll again"],
                                  max_tokens=8, n=3, seed=7, temperature=1.0)
  assert sorted(c.index for c in two.choices) == list(range(6))
  assert [c.text for c in sorted(two.choices, key=lambda c: c.index)][:3] == first


def test_logprobs_and_echo_are_the_models_log_softmax(served, model_params):
  client, *_ = served
  prompt = "Score this text"
  ids = TOKENIZER.encode(prompt)
  logprobs_LxV = _log_softmax(model_params, ids)
  reply = _greedy(client, prompt, 1, logprobs=3)
  block = reply.choices[0].logprobs
  token = int(np.argmax(logprobs_LxV[-1]))
  assert block.tokens == [TOKENIZER.decode([token])] == [reply.choices[0].text]
  np.testing.assert_allclose(block.token_logprobs, [logprobs_LxV[-1, token]], atol=1e-5)
  best = np.argsort(-logprobs_LxV[-1])[:3]
  assert list(block.top_logprobs[0]) == [TOKENIZER.decode([i]) for i in best]
  np.testing.assert_allclose(list(block.top_logprobs[0].values()), logprobs_LxV[-1, best],
                             atol=1e-5)
  assert block.text_offset == [len(prompt)]

  # lm-evaluation-harness's scoring: echo, logprobs, no new tokens.
  scored = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True,
                                     logprobs=1, temperature=0)
  block = scored.choices[0].logprobs
  assert scored.choices[0].text == prompt and block.tokens == list(prompt)
  assert block.token_logprobs[0] is None and block.top_logprobs[0] is None
  np.testing.assert_allclose(block.token_logprobs[1:],
                             logprobs_LxV[np.arange(len(ids) - 1), ids[1:]], atol=1e-5)
  assert block.text_offset == list(range(len(prompt)))
  assert scored.usage.completion_tokens == 0
  echoed = _greedy(client, prompt, 1, echo=True, logprobs=0)
  assert echoed.choices[0].text == prompt + reply.choices[0].text
  assert len(echoed.choices[0].logprobs.tokens) == len(prompt) + 1


def test_chat_with_the_alpaca_template(served):
  client, *_ = served
  render = chat.instruction_template("alpaca")
  messages = [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": "Name a colour."},
              {"role": "assistant", "content": "Red."},
              {"role": "user", "content": "Another?"}]
  preamble = ("Below is an instruction that describes a task. Write a response that "
              "appropriately completes the request.")
  expected = (f"Be brief.\n\n{preamble}\n\n### Instruction:\nName a colour.\n\n### Response:\n"
              f"Red.\n\n{preamble}\n\n### Instruction:\nAnother?\n\n### Response:\n")
  assert render(messages) == expected
  assert chat.instruction_template("phi3")(messages[1:]) == (
      "<|user|>\nName a colour.\n<|assistant|>\nRed.\n<|user|>\nAnother?\n<|assistant|>\n")
  with pytest.raises(JaxllmError, match="last message"):
    render(messages[:3])

  # Through the server: content as text parts; the reply is the completion of that prompt.
  body = [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in messages]
  reply = client.chat.completions.create(model="tiny", messages=body, max_tokens=6,
                                         temperature=0)
  assert reply.usage.prompt_tokens == len(TOKENIZER.encode(expected))
  assert reply.choices[0].message.role == "assistant"
  assert reply.choices[0].message.content == _greedy(client, expected, 6).choices[0].text
  assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion"


def test_a_run_picks_its_chat_template(tmp_path):
  config = default_config()
  assert chat.chat_template_for(tmp_path, config) is None  # pretraining: none
  config.train.task, config.instruct.template = "instruct", "phi3"
  assert chat.chat_template_for(tmp_path, config)([{"role": "user", "content": "hi"}]) == (
      "<|user|>\nhi\n<|assistant|>\n")
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {"chat_template": CHATML, "bos_token": {"content": "<s>"}, "eos_token": "<|im_end|>"}))
  template = chat.chat_template_for(tmp_path, config)  # a converted model's wins
  assert template.stop == ("<|im_end|>",)
  assert template([{"role": "user", "content": "hi"}]).startswith("<s><|im_start|>user\nhi")


def test_a_jinja_template_renders_as_transformers_does(tmp_path, served):
  transformers = pytest.importorskip("transformers")
  tokenizers = pytest.importorskip("tokenizers")
  settings = {"chat_template": CHATML, "bos_token": "<s>", "eos_token": "<|im_end|>"}
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(settings))
  template = chat.chat_template_for(tmp_path, default_config())
  hf = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0}, "<unk>")),
      bos_token="<s>", eos_token="<|im_end|>")
  hf.chat_template = CHATML
  messages = [{"role": "system", "content": "You are terse."},
              {"role": "user", "content": "Say hi."}]
  rendered = template(messages)
  assert rendered == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  assert rendered == ("<s><|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\n"
                      "Say hi.<|im_end|>\n<|im_start|>assistant\n")
  with pytest.raises(JaxllmError, match="unknown role tool"):
    template([{"role": "tool", "content": "x"}])

  client, _, _, switch = served
  switch.template = template
  try:
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5,
                                           temperature=0)
    with pytest.raises(openai.BadRequestError, match="unknown role"):
      client.chat.completions.create(model="tiny", messages=[{"role": "tool", "content": "x"}])
  finally:
    switch.template = chat.instruction_template("alpaca")
  assert reply.usage.prompt_tokens == len(rendered)
  expected = _greedy(client, rendered, 5, stop="<|im_end|>").choices[0]
  assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == (
      expected.text, expected.finish_reason)


def test_chat_stream_and_logprobs(served):
  client, *_ = served
  messages = [{"role": "user", "content": "Count to three."}]
  whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6,
                                         temperature=0, logprobs=True, top_logprobs=2)
  content = whole.choices[0].logprobs.content
  assert "".join(entry.token for entry in content) == whole.choices[0].message.content
  assert all(len(entry.top_logprobs) == 2 and entry.bytes == list(entry.token.encode())
             for entry in content)
  assert content[0].logprob == pytest.approx(content[0].top_logprobs[0].logprob)  # greedy
  chunks = list(client.chat.completions.create(
      model="tiny", messages=messages, max_completion_tokens=6, temperature=0, stream=True,
      stream_options={"include_usage": True}))
  assert chunks[0].choices[0].delta.role == "assistant"
  text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
  assert text == whole.choices[0].message.content
  assert chunks[-2].choices[0].finish_reason == "length"
  assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
  assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_bad_requests_are_openai_errors(served):
  client, url, *_ = served
  with pytest.raises(openai.BadRequestError, match="context length 512") as error:
    _greedy(client, "x" * 600, 4)
  assert error.value.status_code == 400 and error.value.body["type"] == "invalid_request_error"
  with pytest.raises(openai.NotFoundError, match="'gpt-4' does not exist"):
    client.completions.create(model="gpt-4", prompt="hi")
  with pytest.raises(openai.BadRequestError, match=r"logprobs must be in \[0, 5\]"):
    _greedy(client, "hi", 2, logprobs=6)
  with pytest.raises(openai.BadRequestError, match="not in the character vocabulary"):
    _greedy(client, "café", 2)
  with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                   top_logprobs=2)
  with pytest.raises(urllib.error.HTTPError) as error:  # no prompt: FastAPI's 422, as a 400
    _post(url, "/v1/completions", {"max_tokens": 2})
  assert error.value.code == 400
  assert json.loads(error.value.read())["error"]["param"] == "prompt"
  request = urllib.request.Request(f"{url}/v1/completions", b"{not json",
                                   {"Content-Type": "application/json"})
  with pytest.raises(urllib.error.HTTPError) as error:
    urllib.request.urlopen(request)
  assert error.value.code == 400 and "not valid JSON" in error.value.read().decode()


def _metric(url, name):
  text = urllib.request.urlopen(f"{url}/metrics").read().decode()
  samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
  return samples[name], text


def test_health_and_metrics(served):
  client, url, *_ = served
  with urllib.request.urlopen(f"{url}/health") as response:
    assert json.loads(response.read()) == {"status": "ok"}
  before, _ = _metric(url, "jaxllm_generation_tokens_total")
  reply = _greedy(client, "count me", 5)
  after, text = _metric(url, "jaxllm_generation_tokens_total")
  assert after - before == reply.usage.completion_tokens == 5
  assert "jaxllm_requests_running " in text and "jaxllm_time_to_first_token_seconds_count" in text
  with urllib.request.urlopen(f"{url}/metrics") as response:
    assert response.headers["Content-Type"] == prometheus_client.CONTENT_TYPE_LATEST


def test_a_client_that_goes_away_frees_its_slot(served):
  _, url, engine, _ = served
  host, port = url.removeprefix("http://").split(":")
  connection = http.client.HTTPConnection(host, int(port), timeout=60)
  connection.request("POST", "/v1/completions", json.dumps(
      {"prompt": "forever", "max_tokens": 100000, "ignore_eos": True, "stream": True}),
      {"Content-Type": "application/json"})
  response = connection.getresponse()
  assert response.readline().startswith(b"data: ")
  assert engine.stats()["running"] == 1
  connection.close()
  deadline = time.time() + 30
  while engine.stats()["running"] and time.time() < deadline:
    time.sleep(0.05)
  assert engine.stats()["running"] == 0


def test_a_full_queue_is_a_429_and_no_template_a_400(model_params):
  model, params = model_params
  engine = Engine(model, params, TOKENIZER, slots=1, max_queue=0, buckets=BUCKETS)
  busy = engine.submit([1, 2, 3], Sampling(max_tokens=100000, ignore_eos=True), lambda d: None)
  server, thread, url = _start(server_lib.create_app(engine, model_name="busy"))
  client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
  try:
    with pytest.raises(openai.RateLimitError) as error:
      client.completions.create(model="busy", prompt="one more", max_tokens=2)
    assert error.value.status_code == 429
    assert error.value.response.headers["Retry-After"] == "1"
    assert "--max-queue 0" in error.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="no chat template.*/v1/completions"):
      client.chat.completions.create(model="busy", messages=[{"role": "user", "content": "hi"}])
    engine.close()
    with pytest.raises(urllib.error.HTTPError) as error:  # the engine has stopped
      urllib.request.urlopen(f"{url}/health")
    assert error.value.code == 503
  finally:
    busy.cancel()
    _stop(server, thread)
    engine.close()


def test_serve_reads_a_run_directory_and_the_cli_starts_it(tmp_path, model_params, monkeypatch,
                                                            capsys):
  _, params = model_params
  config = default_config()
  for key, value in dict(n_layer=2, n_head=2, d_model=32, context_length=512).items():
    config.model[key] = value
  workdir = rundir.write_run(tmp_path / "tiny-run", config, params, TOKENIZER.to_json())
  assert cli.main(["serve", "--workdir", str(workdir), "--config.train.steps=3"]) == 2
  assert "has no effect on `jaxllm serve`" in capsys.readouterr().err
  servers, make = [], server_lib.http_server

  def recording(app):  # the CLI's server, for the test to stop
    servers.append(make(app))
    return servers[-1]

  monkeypatch.setattr(server_lib, "http_server", recording)
  status = []
  thread = threading.Thread(target=lambda: status.append(cli.main(
      ["serve", "--workdir", str(workdir), "--port", "0", "--no-warm-up", "--slots", "2",
       "--config.model.matmul_dtype=float32"])))
  thread.start()
  deadline = time.time() + 120
  while not (servers and servers[-1].started) and thread.is_alive() and time.time() < deadline:
    time.sleep(0.02)
  try:
    line = capsys.readouterr().out.strip()
    assert line.startswith("jaxllm serve: tiny-run at http://127.0.0.1:") and "chat off" in line
    url = line.split(" at ")[1].split(" ")[0]
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny-run"]
    reply = client.completions.create(model="tiny-run", prompt="Hello there", max_tokens=7,
                                      temperature=0)
    assert reply.usage.completion_tokens == 7
  finally:
    if servers:
      servers[-1].should_exit = True
    thread.join(timeout=60)
  assert status == [0]


def test_the_runs_mesh_is_used_where_it_fits_and_one_device_where_it_does_not(capsys):
  config = default_config()
  mesh = server_lib._mesh(config, given=False)  # (1, 1, 1) on this one device
  assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
  config.mesh.data = 2  # trained on two devices
  mesh = server_lib._mesh(config, given=False)
  assert mesh.devices.size == 1
  assert "the run's mesh (2, 1, 1) does not fit the 1 device(s) here" in capsys.readouterr().out
  with pytest.raises(JaxllmError, match="needs 2 devices, but 1 are available"):  # asked for
    server_lib._mesh(config, given=True)


def test_while_warming_up_generation_and_health_are_503(model_params):
  model, params = model_params
  engine = Engine(model, params, TOKENIZER, slots=1, buckets=BUCKETS)
  gate = threading.Event()
  engine.warm_up = lambda: gate.wait(60)  # a warm-up that lasts until the test lets it end
  server, thread, url = _start(server_lib.create_app(engine, model_name="warm", warm_up=True))
  client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
  try:
    with pytest.raises(openai.InternalServerError) as error:
      client.completions.create(model="warm", prompt="hi", max_tokens=2)
    assert error.value.status_code == 503 and "warming up" in error.value.body["message"]
    assert error.value.response.headers["Retry-After"] == "1"
    with pytest.raises(urllib.error.HTTPError) as health:
      urllib.request.urlopen(f"{url}/health")
    assert health.value.code == 503
  finally:
    gate.set()
  try:
    deadline = time.time() + 30
    while time.time() < deadline:
      try:
        urllib.request.urlopen(f"{url}/health")
        break
      except urllib.error.HTTPError:
        time.sleep(0.05)
    reply = client.completions.create(model="warm", prompt="hi", max_tokens=2, temperature=0)
    assert reply.usage.completion_tokens == 2
    with pytest.raises(openai.BadRequestError, match="max_tokens must be at least 1"):
      client.completions.create(model="warm", prompt="hi", max_tokens=0)
    assert client.completions.create(model="warm", prompt="hi", max_tokens=0, echo=True
                                     ).choices[0].text == "hi"
  finally:
    _stop(server, thread)
    engine.close()
