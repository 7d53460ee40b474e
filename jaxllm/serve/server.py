"""`jaxllm serve`: an OpenAI-compatible HTTP server over the continuous-batching engine.

    GET  /v1/models             the one model served (--model-name)
    POST /v1/completions        prompts as text or token ids; n, stop, seed, logprobs, echo, stream
    POST /v1/chat/completions   messages through the run's chat template (jaxllm/serve/chat.py)
    GET  /health                200 {"status": "ok"} once warm, while the engine's thread runs;
                                503 while warming up and after it stops
    GET  /metrics               the engine's Prometheus metrics

Each (prompt, choice) of a request is one engine request. Its Deltas come on the engine's
thread and reach the event loop through `loop.call_soon_threadsafe`; a stream sends one
server-sent event per Delta that has text (or ends the choice), and a client that goes away
cancels what is left. The bodies and their JSON are in jaxllm/serve/protocol.py.

Errors have OpenAI's shape: 400 for a bad request (a malformed body, a prompt longer than the
context, ...), 404 for a model name that is not the served one (as OpenAI and vLLM answer),
429 with Retry-After when the engine's queue is full (its client retries), 503 with
Retry-After while the engine warms up (compiles its programs), 500 when the engine fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import pathlib
import socket
import threading
import time
from typing import Any, AsyncIterator, Callable, Sequence

import fastapi
import jax
import prometheus_client
import uvicorn
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from jaxllm.errors import JaxllmError
from jaxllm.serve import chat, protocol, streams
from jaxllm.serve.engine import Delta, Engine, QueueFull, Sampling
from jaxllm.training import rundir, sharding

NO_CHAT_TEMPLATE = ("this model has no chat template (a pretrained run): send its prompts to "
                    "/v1/completions, or serve an instruct / dpo run or a converted model whose "
                    "tokenizer_config.json has a chat_template")
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions


@dataclasses.dataclass
class _Prompt:
  """A completions prompt: its ids, its text (token offsets count from its start) and, with
  echo, what its choices begin with."""

  ids: list[int]
  text: str
  echo: str = ""
  echo_logprobs: dict | None = None


class _Api:
  """The endpoints, over one engine serving one model name."""

  def __init__(self, engine: Engine, model_name: str, chat_template: Callable | None):
    self.engine, self.tokenizer = engine, engine.tokenizer
    self.model_name, self.chat_template = model_name, chat_template
    self.created = int(time.time())
    self.warming = False  # compiling: generation is answered 503 until it is done

  def _check_ready(self) -> None:
    if self.warming:
      raise protocol.ApiError(503, "the server is warming up (compiling its programs); try "
                                   "again shortly", "server_error", code="warming_up")

  async def models(self) -> dict:
    return {"object": "list", "data": [{
        "id": self.model_name, "object": "model", "created": self.created, "owned_by": "jaxllm",
        "max_model_len": self.engine.context_length}]}

  async def health(self) -> JSONResponse:
    if self.warming:
      return JSONResponse({"status": "warming up"}, 503, {"Retry-After": "1"})
    if self.engine.is_running():
      return JSONResponse({"status": "ok"})
    return JSONResponse({"status": "the engine has stopped"}, 503)

  async def metrics(self) -> Response:
    return Response(prometheus_client.generate_latest(self.engine.registry),
                    media_type=prometheus_client.CONTENT_TYPE_LATEST)

  def _check_model(self, body: protocol.RequestBody) -> None:
    if body.model is not None and body.model != self.model_name:
      raise protocol.ApiError(404, f"the model '{body.model}' does not exist; this server "
                                   f"serves '{self.model_name}'", param="model",
                              code="model_not_found")

  def _submit(self, jobs: list[tuple[list[int], Sampling]]) -> streams.Requests:
    for ids, sampling in jobs:
      self.engine.check(ids, sampling)
    return streams.Requests(self.engine, jobs)

  async def completions(self, body: protocol.CompletionBody, request: fastapi.Request) -> Any:
    self._check_model(body)
    self._check_ready()
    top = protocol.completion_logprob_count(body.logprobs)
    max_tokens = DEFAULT_COMPLETION_TOKENS if body.max_tokens is None else body.max_tokens
    if max_tokens < 1 and not (max_tokens == 0 and body.echo):
      raise protocol.ApiError(400, f"max_tokens must be at least 1 (0 only with echo, to score "
                                   f"the prompt), got {max_tokens}", param="max_tokens")
    samplings, n = protocol.samplings(body, max_tokens, top), body.n or 1
    prompts = [await self._prompt(ids, text, samplings[0], bool(body.echo), top)
               for ids, text in protocol.completion_prompts(body.prompt, self.tokenizer)]
    requests = self._submit([(prompt.ids, s) for prompt in prompts for s in samplings])
    envelope = protocol.Envelope("text_completion", self.model_name, body.include_usage)
    if body.stream:
      return streams.sse(self._completion_events(requests, envelope, prompts, n, top), requests)
    totals = await streams.gather(requests, request)
    choices = []
    for index, total in enumerate(totals):
      prompt, logprobs = prompts[index // n], None
      if top is not None:
        logprobs = protocol.joined_logprobs(prompt.echo_logprobs, protocol.completion_logprobs(
            self.tokenizer, total.token_ids, total.logprobs, total.top_logprobs, len(prompt.text)))
      choices.append({"index": index, "text": prompt.echo + total.text, "logprobs": logprobs,
                      "finish_reason": total.finish_reason})
    return envelope.body(choices, usage=protocol.usage(totals, n))

  async def _prompt(self, ids: list[int], text: str | None, sampling: Sampling, echo: bool,
                    top: int | None) -> _Prompt:
    """A checked prompt, its text, and with `echo` what its choices begin with: the prompt and,
    with logprobs, its tokens' (scored off the event loop)."""
    self.engine.check(ids, sampling)
    prompt = _Prompt(ids, self.tokenizer.decode(ids) if text is None else text)
    if echo:
      prompt.echo = prompt.text
    if echo and top is not None:
      logprobs, tops = await asyncio.to_thread(self.engine.prompt_logprobs, ids, top)
      prompt.echo_logprobs = protocol.completion_logprobs(self.tokenizer, ids, logprobs, tops, 0)
    return prompt

  async def _completion_events(self, requests: streams.Requests, envelope: protocol.Envelope,
                               prompts: list[_Prompt], n: int, top: int | None
                               ) -> AsyncIterator[dict]:
    # Where each choice's next token starts: offsets count from the prompt's start, as OpenAI's.
    offsets = [len(prompts[index // n].text) for index in range(len(requests.handles))]
    finals = [Delta("", [], [], []) for _ in requests.handles]
    for index in range(len(requests.handles)):
      prompt = prompts[index // n]
      if prompt.echo:
        yield envelope.chunk({"index": index, "text": prompt.echo,
                              "logprobs": prompt.echo_logprobs, "finish_reason": None})
    async for index, delta in requests.deltas():
      finals[index] = delta
      if not (delta.text or delta.finish_reason or (top is not None and delta.token_ids)):
        continue  # text held back (a possible stop string), nothing to say yet
      logprobs = None
      if top is not None:
        logprobs = protocol.completion_logprobs(self.tokenizer, delta.token_ids, delta.logprobs,
                                                delta.top_logprobs, offsets[index])
        offsets[index] += sum(map(len, logprobs["tokens"]))
      yield envelope.chunk({"index": index, "text": delta.text, "logprobs": logprobs,
                            "finish_reason": delta.finish_reason})
    if envelope.include_usage:
      yield envelope.body([], usage=protocol.usage(finals, n))

  async def chat_completions(self, body: protocol.ChatBody, request: fastapi.Request) -> Any:
    self._check_model(body)
    if self.chat_template is None:
      raise protocol.ApiError(400, NO_CHAT_TEMPLATE, param="messages")
    ids = self.tokenizer.encode(self.chat_template(protocol.chat_messages(body.messages)))
    top = protocol.chat_logprob_count(body)
    max_tokens = next((m for m in (body.max_completion_tokens, body.max_tokens) if m is not None),
                      max(self.engine.context_length - len(ids), 1))  # vLLM's: what fits
    if max_tokens < 1:
      raise protocol.ApiError(400, f"max_tokens must be at least 1, got {max_tokens}",
                              param="max_tokens")
    samplings = protocol.samplings(body, max_tokens, top, getattr(self.chat_template, "stop", ()))
    requests = self._submit([(ids, sampling) for sampling in samplings])
    if body.stream:
      envelope = protocol.Envelope("chat.completion.chunk", self.model_name, body.include_usage)
      return streams.sse(self._chat_events(requests, envelope, top), requests)
    totals = await streams.gather(requests, request)
    choices = [{"index": index, "message": {"role": "assistant", "content": total.text},
                "logprobs": None if top is None else protocol.chat_logprobs(
                    self.tokenizer, total.token_ids, total.logprobs, total.top_logprobs),
                "finish_reason": total.finish_reason} for index, total in enumerate(totals)]
    envelope = protocol.Envelope("chat.completion", self.model_name)
    return envelope.body(choices, usage=protocol.usage(totals, len(totals)))

  async def _chat_events(self, requests: streams.Requests, envelope: protocol.Envelope,
                         top: int | None) -> AsyncIterator[dict]:
    def choice(index: int, delta: dict, logprobs: dict | None = None, finish: str | None = None):
      return envelope.chunk({"index": index, "delta": delta, "logprobs": logprobs,
                             "finish_reason": finish})

    finals = [Delta("", [], [], []) for _ in requests.handles]
    for index in range(len(requests.handles)):
      yield choice(index, {"role": "assistant", "content": ""})
    async for index, delta in requests.deltas():
      finals[index] = delta
      if delta.text or (top is not None and delta.token_ids):
        yield choice(index, {"content": delta.text}, None if top is None else protocol.chat_logprobs(
            self.tokenizer, delta.token_ids, delta.logprobs, delta.top_logprobs))
      if delta.finish_reason:
        yield choice(index, {}, finish=delta.finish_reason)
    if envelope.include_usage:
      yield envelope.body([], usage=protocol.usage(finals, len(finals)))


def _answer(error: protocol.ApiError) -> JSONResponse:
  headers = {"Retry-After": "1"} if error.status in (429, 503) else None
  return JSONResponse(error.body, error.status, headers)


def _error_handlers(app: fastapi.FastAPI) -> None:
  """Every error in OpenAI's shape."""
  @app.exception_handler(protocol.ApiError)
  async def api_error(request, e: protocol.ApiError):
    return _answer(e)

  @app.exception_handler(JaxllmError)  # engine.check, the tokenizer, the chat template
  async def bad_request(request, e: JaxllmError):
    return _answer(protocol.ApiError(400, str(e)))

  @app.exception_handler(QueueFull)
  async def queue_full(request, e: QueueFull):
    return _answer(protocol.ApiError(429, str(e), "rate_limit_error", code="queue_full"))

  @app.exception_handler(RequestValidationError)  # a malformed body (FastAPI's would be a 422)
  async def malformed(request, e: RequestValidationError):
    first = (e.errors() or [{}])[0]
    if first.get("type") == "json_invalid":
      reason = first.get("ctx", {}).get("error", "JSON decode error")
      return _answer(protocol.ApiError(400, f"the body is not valid JSON ({reason})"))
    where = ".".join(str(part) for part in first.get("loc", ())[1:])  # after "body"
    message = f"{where}: {first.get('msg', 'invalid')}" if where else first.get("msg", "invalid")
    return _answer(protocol.ApiError(400, f"malformed request: {message}", param=where or None))

  @app.exception_handler(HTTPException)  # an unknown path or method
  async def http_error(request, e: HTTPException):
    return _answer(protocol.ApiError(e.status_code, str(e.detail)))


def create_app(engine: Engine, *, model_name: str,
               chat_template: Callable[[list[dict]], str] | None = None,
               warm_up: bool = False) -> fastapi.FastAPI:
  """The OpenAI-compatible API over `engine` (started with the app; the caller closes it).
  `chat_template` renders chat messages as a prompt (chat.chat_template_for); without one,
  chat requests are refused. `warm_up`: the engine compiles its programs as the server
  starts, generation answered 503 until it is done."""
  api = _Api(engine, model_name, chat_template)

  @contextlib.asynccontextmanager
  async def lifespan(app: fastapi.FastAPI):
    engine.start()
    warming = None
    if warm_up:
      api.warming = True
      warming = asyncio.get_running_loop().run_in_executor(None, _warm, engine, api)
    yield
    if warming is not None:
      warming.cancel()

  app = fastapi.FastAPI(title="jaxllm", lifespan=lifespan)
  _error_handlers(app)
  for method, path, endpoint in (("GET", "/v1/models", api.models),
                                 ("POST", "/v1/completions", api.completions),
                                 ("POST", "/v1/chat/completions", api.chat_completions),
                                 ("GET", "/health", api.health), ("GET", "/metrics", api.metrics)):
    app.add_api_route(path, endpoint, methods=[method], response_model=None)
  return app


def _warm(engine: Engine, api: _Api) -> None:
  started = time.perf_counter()
  try:
    engine.warm_up()
  finally:
    api.warming = False
  print(f"jaxllm serve: ready ({len(engine.buckets)} prompt lengths compiled in "
        f"{time.perf_counter() - started:.1f} s)", flush=True)


def listen(host: str, port: int) -> socket.socket:
  """A socket bound to host:port (port 0: a free one), or a one-line error naming the fix."""
  sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind((host, port))
  except OSError as e:
    sock.close()
    raise JaxllmError(f"cannot listen on {host}:{port} ({e.strerror or e}); pass another "
                      f"--port (or --host)") from None
  return sock


def http_server(app: fastapi.FastAPI) -> uvicorn.Server:
  """uvicorn's server for `app`, to `run(sockets=[listen(...)])`; `should_exit = True` stops it
  (after at most 5 s for the streams still open)."""
  # log_config=None: uvicorn's warnings and errors go through Python's logging as it stands,
  # to whatever sys.stderr is when they happen (its own config binds the stream at start).
  return uvicorn.Server(uvicorn.Config(app, log_level="warning", log_config=None,
                                       timeout_graceful_shutdown=5))


class Background:
  """A server for `app` on a thread of this process (a notebook, a test): `.url`, `.stop()`."""

  def __init__(self, app: fastapi.FastAPI, host: str = "127.0.0.1", port: int = 0):
    sock = listen(host, port)
    self.server = http_server(app)
    self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                   daemon=True)
    self.thread.start()
    while not self.server.started:
      if not self.thread.is_alive():
        raise JaxllmError(f"the server on {host}:{port} stopped as it started")
      time.sleep(0.01)
    self.url = f"http://{host}:{sock.getsockname()[1]}"

  def stop(self) -> None:
    self.server.should_exit = True
    self.thread.join(timeout=30)


def _mesh(config: Any, given: bool):
  """The run's mesh (config.mesh, as --config.mesh.* sets it), or one device where the mesh
  it trained on does not fit this machine and none was given."""
  try:
    return sharding.make_mesh(config.mesh)
  except JaxllmError:
    if given:
      raise
  one = {"data": 1, "fsdp": 1, "tensor": 1}
  print(f"jaxllm serve: the run's mesh {tuple(config.mesh[a] for a in one)} does not fit the "
        f"{jax.device_count()} device(s) here; serving on one (set --config.mesh.* to choose)",
        flush=True)
  return sharding.make_mesh(one, jax.devices()[:1])


def serve(workdir: str | pathlib.Path, host: str = "127.0.0.1", port: int = 8000,
          slots: int = 8, max_queue: int = 64, model_name: str | None = None,
          overrides: Sequence[str] = (), warm_up: bool = True) -> None:
  """Serves the run in `workdir` until interrupted. `overrides`: how its network runs
  (model.matmul_dtype=bfloat16, ...)."""
  config, model, params, tokenizer = rundir.load_run(workdir, decoder_for="serving text",
                                                     overrides=list(overrides))
  template = chat.chat_template_for(workdir, config)
  name = model_name or pathlib.Path(workdir).resolve().name
  mesh = _mesh(config, given=any(o.startswith("mesh.") for o in overrides))
  rules = sharding.logical_rules(config.mesh.rules)
  sharding.check_divisible(*sharding.model_axes(model), mesh, rules)
  sock = listen(host, port)  # before the warm-up: a port in use fails at once
  engine = Engine(model, params, tokenizer, slots=slots, max_queue=max_queue, mesh=mesh,
                  rules=rules).start()
  try:
    server = http_server(create_app(engine, model_name=name, chat_template=template,
                                    warm_up=warm_up))
    address = f"[{host}]" if ":" in host else host
    print(f"jaxllm serve: {name} at http://{address}:{sock.getsockname()[1]}/v1 ({slots} slots, "
          f"chat {'on' if template else 'off'}{', warming up' if warm_up else ''})", flush=True)
    server.run(sockets=[sock])
  finally:
    engine.close()
    sock.close()
