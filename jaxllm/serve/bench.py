"""`jaxllm bench-serve`: the serving benchmark of vLLM's benchmark_serving (`vllm bench serve`)
against any OpenAI-compatible server (`jaxllm serve`, vLLM, `transformers serve`, ...).

    jaxllm serve --workdir runs/shakespeare_char --slots 8 &
    jaxllm bench-serve --url http://127.0.0.1:8000 --requests 200 --concurrency 8 \\
        --prompt-len 32 --output-len 64 --json bench.json --plot bench.png
    jaxllm bench-serve --url http://127.0.0.1:8000 --requests 100 --rate 4 --seed 1

Each request is streamed (`stream: true`, `stream_options: {"include_usage": true}`) with
`max_tokens` = --output-len and `ignore_eos: true` (a vLLM extension `jaxllm serve` honours),
so every request generates exactly that many tokens where the server allows it. Per request:
  TTFT  time to first token: from sending the request to the first chunk that carries text;
  ITL   inter-token latency: every gap between two chunks that carry text;
  E2E   end-to-end latency: from sending to the end of the stream;
  TPOT  time per output token after the first: (E2E - TTFT) / (output tokens - 1).
Output tokens are the server's count (the final chunk's usage), or the chunks that carry text
when it sends none; prompt tokens too are the server's count.

Prompts: the client does not know the server's tokenizer, so a prompt is --prompt-len words
drawn from a list of common English words (one token each in GPT-2's BPE, so P words are P
tokens; several for a character model), different for each request and the same for the same
--seed; the server's mean prompt token count is reported, so the actual length is known.
--endpoint chat sends each prompt as one user message to /v1/chat/completions instead (the
server's chat template adds its own tokens).

Arrivals: --rate inf (the default) sends every request at once, --rate R at Poisson arrivals of
R requests/s (exponential gaps, drawn from --seed); --concurrency C keeps at most C requests in
flight (a request that arrives when C are running waits for one to finish).

Printed: vLLM's "Serving Benchmark Result" block (mean, median, std, P99 of TTFT, TPOT, ITL and
E2E in ms; request, output-token and total-token throughput over the run's duration), and a
line naming how many requests failed and the first error (an HTTP error status, a refused
connection, a stream that ends without text): failures are counted, never fatal. --json FILE
writes every figure, the settings and each request's record; --plot FILE a PNG of the TTFT and
TPOT histograms and the latencies over the run. Exits 1 when no request completed. An
OPENAI_API_KEY in the environment is sent as a bearer token.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import math
import os
import random
import threading
import time
import urllib.parse

import numpy as np

# One token each (with its leading space) in GPT-2's BPE; lowercase ASCII, which a character
# model's vocabulary has too.
WORDS = ("the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be",
         "by", "on", "not", "he", "this", "are", "or", "his", "from", "at", "which", "but",
         "have", "an", "had", "they", "you", "were", "their", "one", "all", "we", "can", "her",
         "has", "there", "been", "if", "more", "when", "will", "would", "who", "so", "no",
         "time", "people", "year", "way", "day", "man", "thing", "world", "life", "hand",
         "part", "child", "eye", "place", "work", "week", "case", "point", "number", "group",
         "water", "light", "house", "city", "story", "book", "river", "stone", "music", "tree")
ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
METRICS = (("ttft", "Time to First Token", "TTFT"),
           ("tpot", "Time per Output Token (excl. 1st token)", "TPOT"),
           ("itl", "Inter-token Latency", "ITL"), ("e2el", "End-to-end Latency", "E2EL"))


@dataclasses.dataclass
class Record:
  """One request: when it was due and sent (seconds from the run's start), its latencies in
  seconds, the server's token counts, and its error (None when it completed)."""

  index: int
  scheduled: float
  sent: float | None = None
  ttft: float | None = None
  e2e: float | None = None
  itl: list[float] = dataclasses.field(default_factory=list)
  prompt_tokens: int | None = None
  output_tokens: int | None = None
  error: str | None = None

  @property
  def tpot(self) -> float | None:
    if self.error or not self.output_tokens or self.output_tokens < 2:
      return None
    return (self.e2e - self.ttft) / (self.output_tokens - 1)


def arrival_times(requests: int, rate: float, seed: int) -> list[float]:
  """When each request is sent, in seconds from the start: all at 0 for an infinite rate, else
  a Poisson process of `rate` requests/s (the first at 0, then exponential gaps)."""
  if math.isinf(rate):
    return [0.0] * requests
  draw = random.Random(seed)
  times, now = [], 0.0
  for _ in range(requests):
    times.append(now)
    now += draw.expovariate(rate)
  return times


def make_prompts(requests: int, prompt_len: int, seed: int) -> list[str]:
  """`prompt_len` random words per request, each request its own (a string seed keeps these
  draws apart from the arrivals')."""
  draw = random.Random(f"prompts-{seed}")
  return [" ".join(draw.choice(WORDS) for _ in range(prompt_len)) for _ in range(requests)]


def request_body(endpoint: str, model: str | None, prompt: str, output_len: int,
                 temperature: float, ignore_eos: bool = True) -> dict:
  asked = ({"messages": [{"role": "user", "content": prompt}]} if endpoint == "chat"
           else {"prompt": prompt})
  return {**({} if model is None else {"model": model}), **asked, "max_tokens": output_len,
          "temperature": temperature, **({"ignore_eos": True} if ignore_eos else {}),
          "stream": True, "stream_options": {"include_usage": True}}


def _connection(base: urllib.parse.SplitResult, timeout: float) -> http.client.HTTPConnection:
  kind = http.client.HTTPSConnection if base.scheme == "https" else http.client.HTTPConnection
  return kind(base.hostname, base.port, timeout=timeout)


def _headers() -> dict:
  headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
  if os.environ.get("OPENAI_API_KEY"):
    headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"
  return headers


def _error_text(raw: bytes) -> str:
  """OpenAI's {"error": {"message": ...}} (FastAPI's {"detail": ...}), else the body's start."""
  try:
    body = json.loads(raw)
    error = body.get("error", body.get("detail", body))
    return str(error.get("message", error) if isinstance(error, dict) else error)[:300]
  except (ValueError, AttributeError):
    return raw.decode(errors="replace").strip()[:300] or "(no body)"


def _text(event: dict) -> str:
  """The text a stream chunk carries: a completion's text or a chat delta's content."""
  choices = event.get("choices") or [{}]
  delta = choices[0].get("delta")
  return ((delta or {}).get("content") if delta is not None else choices[0].get("text")) or ""


def _read_stream(response: http.client.HTTPResponse, record: Record, sent: float) -> None:
  """Times the chunks of a server-sent event stream into `record`."""
  last, chunks = None, 0
  for raw in response:
    line = raw.strip()
    if not line.startswith(b"data:"):
      continue  # blank separators, `: keep-alive` comments
    data = line[len(b"data:"):].strip()
    if data == b"[DONE]":
      break
    event = json.loads(data)
    if "error" in event:
      record.error = f"error in the stream: {_error_text(data)}"
      return
    if event.get("usage"):
      record.prompt_tokens = event["usage"].get("prompt_tokens")
      record.output_tokens = event["usage"].get("completion_tokens")
    if _text(event):
      now = time.perf_counter()
      if last is None:
        record.ttft = now - sent
      else:
        record.itl.append(now - last)
      last, chunks = now, chunks + 1
  record.e2e = time.perf_counter() - sent
  if last is None:
    record.error = "the stream ended without any text"
  elif record.output_tokens is None:
    record.output_tokens = chunks  # no usage sent: one token per chunk


def send(base: urllib.parse.SplitResult, path: str, body: dict, record: Record, start: float,
         timeout: float) -> None:
  """One streamed request, its timings and error into `record`; never raises."""
  sent = time.perf_counter()
  record.sent = sent - start
  connection = _connection(base, timeout)
  try:
    connection.request("POST", base.path.rstrip("/") + path, json.dumps(body), _headers())
    response = connection.getresponse()
    if response.status != 200:
      record.error = f"HTTP {response.status}: {_error_text(response.read())}"
    else:
      _read_stream(response, record, sent)
  except Exception as e:  # refused, reset, timed out, a body that is not OpenAI's: counted
    record.error = f"{type(e).__name__}: {e}"
  finally:
    connection.close()


def base_url(url: str) -> urllib.parse.SplitResult:
  """The server's root: http://host:port, with or without a trailing /v1."""
  base = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
  path = base.path.rstrip("/")
  return base._replace(path=path[:-len("/v1")] if path.endswith("/v1") else path)


def served_model(base: urllib.parse.SplitResult, timeout: float) -> str | None:
  """The first model of GET /v1/models; None when the server does not say."""
  connection = _connection(base, timeout)
  try:
    connection.request("GET", base.path + "/v1/models", headers=_headers())
    response = connection.getresponse()
    models = json.loads(response.read()).get("data") if response.status == 200 else None
    return models[0]["id"] if models else None
  except (OSError, http.client.HTTPException, ValueError, KeyError, TypeError):
    return None
  finally:
    connection.close()


def run(url: str, prompts: list[str], schedule: list[float], *, endpoint: str = "completions",
        model: str | None = None, output_len: int = 64, temperature: float = 0.0,
        concurrency: int | None = None, timeout: float = 300.0, ignore_eos: bool = True
        ) -> tuple[list[Record], float]:
  """Sends each prompt at its time of `schedule`, at most `concurrency` in flight, one thread
  each; returns the records and the run's duration in seconds."""
  base = base_url(url)
  records = [Record(i, scheduled) for i, scheduled in enumerate(schedule)]
  gate = threading.BoundedSemaphore(concurrency or max(len(prompts), 1))

  def one(record: Record, prompt: str) -> None:
    try:
      body = request_body(endpoint, model, prompt, output_len, temperature, ignore_eos)
      send(base, ENDPOINTS[endpoint], body, record, start, timeout)
    finally:
      gate.release()

  threads = []
  start = time.perf_counter()
  for record, prompt in zip(records, prompts):
    time.sleep(max(start + record.scheduled - time.perf_counter(), 0.0))
    gate.acquire()
    threads.append(threading.Thread(target=one, args=(record, prompt), daemon=True))
    threads[-1].start()
  for thread in threads:
    thread.join()
  return records, time.perf_counter() - start


def _stats(name: str, seconds: list[float]) -> dict[str, float | None]:
  """Mean, median, std and P99 in milliseconds (numpy's linear percentile, as vLLM's)."""
  ms = np.asarray(seconds, np.float64) * 1000
  figures = {"mean": np.mean, "median": np.median, "std": np.std,
             "p99": lambda x: np.percentile(x, 99)}
  return {f"{kind}_{name}_ms": float(f(ms)) if ms.size else None for kind, f in figures.items()}


def summarize(records: list[Record], duration: float) -> dict:
  """vLLM's figures (its JSON names), with failed, first_error and mean_prompt_tokens."""
  done = [r for r in records if r.error is None]
  failed = [r for r in records if r.error is not None]
  prompt_counts = [r.prompt_tokens for r in done if r.prompt_tokens is not None]
  input_tokens, output_tokens = sum(prompt_counts), sum(r.output_tokens or 0 for r in done)
  summary = {
      "duration": duration, "completed": len(done), "failed": len(failed),
      "first_error": failed[0].error if failed else None,
      "total_input_tokens": input_tokens, "total_output_tokens": output_tokens,
      "mean_prompt_tokens": input_tokens / len(prompt_counts) if prompt_counts else None,
      "request_throughput": len(done) / duration,
      "output_throughput": output_tokens / duration,
      "total_token_throughput": (input_tokens + output_tokens) / duration}
  samples = {"ttft": [r.ttft for r in done], "tpot": [r.tpot for r in done if r.tpot is not None],
             "itl": [gap for r in done for gap in r.itl], "e2el": [r.e2e for r in done]}
  for name, values in samples.items():
    summary.update(_stats(name, values))
  return summary


def format_table(summary: dict) -> str:
  """The block vLLM's benchmark prints, with failures, the prompt length, std and E2E too."""
  def row(label: str, value) -> str:
    shown = "n/a" if value is None else f"{value:.2f}" if isinstance(value, float) else value
    return f"{label:<40} {shown:<10}".rstrip()

  lines = [f"{' Serving Benchmark Result ':=^50}",
           row("Successful requests:", summary["completed"]),
           row("Failed requests:", summary["failed"]),
           row("Benchmark duration (s):", summary["duration"]),
           row("Total input tokens:", summary["total_input_tokens"]),
           row("Mean prompt tokens (server's count):", summary["mean_prompt_tokens"]),
           row("Total generated tokens:", summary["total_output_tokens"]),
           row("Request throughput (req/s):", summary["request_throughput"]),
           row("Output token throughput (tok/s):", summary["output_throughput"]),
           row("Total Token throughput (tok/s):", summary["total_token_throughput"])]
  for name, title, short in METRICS:
    lines.append(f"{title:-^50}")
    for kind, label in (("mean", "Mean"), ("median", "Median"), ("std", "Std"), ("p99", "P99")):
      lines.append(row(f"{label} {short} (ms):", summary[f"{kind}_{name}_ms"]))
  lines.append("=" * 50)
  return "\n".join(lines)


def failure_line(summary: dict, requests: int) -> str:
  if not summary["failed"]:
    return f"all {requests} requests completed"
  return f"{summary['failed']} of {requests} requests failed; the first: {summary['first_error']}"


def write_json(path: str, settings: dict, summary: dict, records: list[Record]) -> None:
  rows = [{**dataclasses.asdict(r), "tpot": r.tpot} for r in records]
  with open(path, "w") as f:
    json.dump({"settings": settings, **summary, "requests": rows}, f, indent=1)
    f.write("\n")


def plot(path: str, records: list[Record]) -> None:
  """Histograms of TTFT and TPOT, and each request's TTFT and E2E against when it was sent."""
  from matplotlib.figure import Figure  # no pyplot: no display, no global state

  done = [r for r in records if r.error is None]
  figure = Figure(figsize=(15, 4), layout="constrained")
  ttft_axes, tpot_axes, time_axes = figure.subplots(1, 3)
  for axes, values, name in ((ttft_axes, [r.ttft for r in done], "TTFT"),
                             (tpot_axes, [r.tpot for r in done if r.tpot is not None], "TPOT")):
    axes.hist(np.asarray(values) * 1000, bins=30)
    axes.set(xlabel=f"{name} (ms)", ylabel="requests", title=f"{name} of {len(values)} requests")
  sent = np.asarray([r.sent for r in done])
  time_axes.scatter(sent, [r.e2e * 1000 for r in done], s=8, label="E2E")
  time_axes.scatter(sent, [r.ttft * 1000 for r in done], s=8, label="TTFT")
  failed = [r.sent for r in records if r.error is not None and r.sent is not None]
  if failed:
    time_axes.scatter(failed, [0] * len(failed), marker="x", color="red", label="failed")
  time_axes.set(xlabel="sent at (s from start)", ylabel="latency (ms)", title="over the run")
  time_axes.legend()
  figure.savefig(path, dpi=100)


def _positive(kind):
  def parse(text: str):
    value = kind(text)
    if not value > 0:
      raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value
  return parse


def add_parser(commands) -> None:
  bench = commands.add_parser(
      "bench-serve", help="benchmark an OpenAI-compatible server (TTFT, TPOT, ITL, throughput)",
      description="vLLM's serving benchmark: streamed requests of about --prompt-len words and "
                  "exactly --output-len tokens (ignore_eos), all at once or at Poisson arrivals; "
                  "TTFT, TPOT, ITL and end-to-end latency (mean, median, std, P99) and "
                  "throughput. Against jaxllm serve, vLLM, transformers serve, ...")
  bench.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
  bench.add_argument("--requests", type=_positive(int), required=True, metavar="N")
  bench.add_argument("--rate", type=_positive(float), default=math.inf, metavar="R",
                     help="Poisson arrivals, requests/s (default inf: all at once)")
  bench.add_argument("--concurrency", type=_positive(int), metavar="C",
                     help="most requests in flight (default: no cap)")
  bench.add_argument("--prompt-len", type=_positive(int), default=64, metavar="P",
                     help="words per prompt: about as many tokens (the server's count is shown)")
  bench.add_argument("--output-len", type=_positive(int), default=64, metavar="O",
                     help="tokens per request")
  bench.add_argument("--model", metavar="NAME", help="default: the first of /v1/models")
  bench.add_argument("--seed", type=int, default=0, metavar="S", help="prompts and arrivals")
  bench.add_argument("--temperature", type=float, default=0.0, metavar="T")
  bench.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                     help="leave ignore_eos out, for servers that refuse it (transformers "
                          "serve); a request may then end early at end-of-text")
  bench.add_argument("--endpoint", choices=tuple(ENDPOINTS), default="completions")
  bench.add_argument("--timeout", type=_positive(float), default=300.0, metavar="SECONDS",
                     help="how long a request may wait on the server")
  bench.add_argument("--json", metavar="FILE", help="every figure and each request's record")
  bench.add_argument("--plot", metavar="FILE", help="a PNG of the latencies")


def main(args: argparse.Namespace) -> int:
  """`jaxllm bench-serve`: run, print, write; 1 when no request completed."""
  model = args.model or served_model(base_url(args.url), args.timeout)
  settings = {key: getattr(args, key) for key in (
      "url", "endpoint", "requests", "concurrency", "prompt_len", "output_len", "seed",
      "temperature", "ignore_eos")}
  settings.update(model=model, rate=str(args.rate) if math.isinf(args.rate) else args.rate)
  arrivals = "all at once" if math.isinf(args.rate) else f"Poisson at {args.rate:g}/s"
  print(f"bench-serve: {args.requests} requests to {args.url} ({args.endpoint}, model {model}), "
        f"{arrivals}, concurrency {args.concurrency or 'unlimited'}, "
        f"{args.prompt_len} prompt words, {args.output_len} output tokens", flush=True)
  records, duration = run(
      args.url, make_prompts(args.requests, args.prompt_len, args.seed),
      arrival_times(args.requests, args.rate, args.seed), endpoint=args.endpoint, model=model,
      output_len=args.output_len, temperature=args.temperature, concurrency=args.concurrency,
      timeout=args.timeout, ignore_eos=args.ignore_eos)
  summary = summarize(records, duration)
  print(format_table(summary))
  print(failure_line(summary, args.requests))
  if args.json:
    write_json(args.json, settings, summary, records)
  if args.plot:
    plot(args.plot, records)
  return 0 if summary["completed"] else 1
