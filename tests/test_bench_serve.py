"""`jaxllm bench-serve` (jaxllm/serve/bench.py) against a real `jaxllm serve` on 127.0.0.1: a tiny
random GPT with a character tokenizer, four slots, in a thread."""

import json
import math
import socket
import string

import jax
import pytest

from jaxllm import cli
from jaxllm.config import ModelConfig
from jaxllm.data.tokenizer import CharTokenizer
from jaxllm.models.gpt import GPT, init_params
from jaxllm.serve import bench
from jaxllm.serve import server as server_lib
from jaxllm.serve.engine import Engine

TOKENIZER = CharTokenizer(string.ascii_letters + string.digits + " .,:;!?#<>|_'-\n")
CONFIG = ModelConfig(vocab_size=TOKENIZER.vocab_size, context_length=128, n_layer=2, n_head=2,
                     d_model=32)


@pytest.fixture(scope="module")
def url():
  model = GPT(CONFIG)
  engine = Engine(model, init_params(model, jax.random.key(0)), TOKENIZER, slots=4, max_queue=32,
                  buckets=(64, 128))
  app = server_lib.create_app(engine, model_name="tiny",
                              chat_template=lambda messages: messages[-1]["content"])
  background = server_lib.Background(app)
  yield background.url
  background.stop()
  engine.close()


def _most_in_flight(records):
  events = sorted([(r.sent, 1) for r in records] + [(r.sent + r.e2e, -1) for r in records],
                  key=lambda event: (event[0], event[1]))
  running = most = 0
  for _, change in events:
    running += change
    most = max(most, running)
  return most


def test_a_run_measures_every_request(url, tmp_path, capsys):
  out, picture = tmp_path / "bench.json", tmp_path / "bench.png"
  status = cli.main(["bench-serve", "--url", url, "--requests", "12", "--concurrency", "4",
                     "--prompt-len", "8", "--output-len", "5", "--json", str(out),
                     "--plot", str(picture)])
  printed = capsys.readouterr().out
  assert status == 0
  assert "model tiny" in printed and "all 12 requests completed" in printed
  assert "============ Serving Benchmark Result ============" in printed
  for label in ("Successful requests:                     12", "Failed requests:", "P99 TTFT (ms):",
                "Median TPOT (ms):", "Mean ITL (ms):", "Std E2EL (ms):"):
    assert label in printed
  result = json.loads(out.read_text())
  assert (result["completed"], result["failed"], result["first_error"]) == (12, 0, None)
  records = result["requests"]
  assert [r["output_tokens"] for r in records] == [5] * 12
  assert all(0 < r["ttft"] <= r["e2e"] and r["tpot"] > 0 and len(r["itl"]) == 4
             for r in records)
  assert result["total_output_tokens"] == 60
  assert result["request_throughput"] == pytest.approx(12 / result["duration"])
  assert result["output_throughput"] == pytest.approx(60 / result["duration"])
  # Each prompt is 8 words of the list, each word one token per character.
  assert result["mean_prompt_tokens"] == pytest.approx(
      sum(map(len, bench.make_prompts(12, 8, 0))) / 12)
  assert result["total_token_throughput"] == pytest.approx(
      (result["total_input_tokens"] + 60) / result["duration"])
  assert result["mean_ttft_ms"] <= result["mean_e2el_ms"]
  assert result["p99_itl_ms"] >= result["median_itl_ms"] > 0
  assert result["settings"]["rate"] == "inf" and result["settings"]["model"] == "tiny"
  assert _most_in_flight([bench.Record(0, 0, r["sent"], e2e=r["e2e"]) for r in records]) <= 4
  assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_poisson_arrivals_on_the_chat_endpoint(url):
  schedule = bench.arrival_times(4, 40.0, seed=1)
  records, duration = bench.run(url, bench.make_prompts(4, 3, 1), schedule, endpoint="chat",
                                model="tiny", output_len=5)
  assert [r.error for r in records] == [None] * 4
  assert [r.output_tokens for r in records] == [5] * 4
  assert all(r.sent >= r.scheduled for r in records)
  assert duration >= schedule[-1]


def test_failures_are_counted_not_fatal(url, capsys):
  records, duration = bench.run(url, ["hi"] * 3, [0.0] * 3, model="gpt-4", output_len=2)
  summary = bench.summarize(records, duration)
  assert (summary["completed"], summary["failed"]) == (0, 3)
  assert summary["first_error"].startswith("HTTP 404: the model 'gpt-4' does not exist")
  assert summary["mean_ttft_ms"] is None and "n/a" in bench.format_table(summary)
  assert bench.failure_line(summary, 3).startswith("3 of 3 requests failed; the first: HTTP 404")

  with socket.socket() as sock:  # a port with nothing listening
    sock.bind(("127.0.0.1", 0))
    closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
  assert cli.main(["bench-serve", "--url", closed, "--requests", "3", "--output-len", "2"]) == 1
  printed = capsys.readouterr().out
  assert "Successful requests:                     0" in printed
  assert "3 of 3 requests failed; the first: ConnectionRefusedError" in printed


def test_the_poisson_schedule_is_seeded():
  first = bench.arrival_times(2000, 5.0, seed=3)
  assert first == bench.arrival_times(2000, 5.0, seed=3)
  assert first != bench.arrival_times(2000, 5.0, seed=4)
  assert first[0] == 0 and all(b > a for a, b in zip(first, first[1:]))
  assert first[-1] / 1999 == pytest.approx(1 / 5.0, rel=0.1)  # mean gap 1/rate
  assert bench.arrival_times(3, math.inf, seed=3) == [0.0, 0.0, 0.0]
  prompts = bench.make_prompts(5, 8, 0)
  assert prompts == bench.make_prompts(5, 8, 0) and len(set(prompts)) == 5
  assert all(len(p.split()) == 8 for p in prompts)


def test_the_url_may_name_v1_and_rates_must_be_positive(capsys):
  assert bench.base_url("http://host:9/v1/").path == ""
  assert bench.base_url("localhost:8000").port == 8000
  with pytest.raises(SystemExit):
    cli.main(["bench-serve", "--url", "x", "--requests", "2", "--rate", "0"])
  assert "must be more than 0" in capsys.readouterr().err
