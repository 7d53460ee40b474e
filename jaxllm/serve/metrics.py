"""What `jaxllm serve` exports for Prometheus: requests running and waiting, slots in use,
tokens, and the time to the first token and between tokens."""

import prometheus_client


class EngineMetrics:
  """The engine's gauges, counters and histograms, in a registry of their own."""

  def __init__(self, registry: prometheus_client.CollectorRegistry, slots: int):
    self.registry = registry
    self.running = prometheus_client.Gauge(
        "jaxllm_requests_running", "requests decoding in a slot", registry=registry)
    self.waiting = prometheus_client.Gauge(
        "jaxllm_requests_waiting", "requests queued for a slot", registry=registry)
    self.slots_total = prometheus_client.Gauge(
        "jaxllm_slots", "decode slots (rows of the KV cache)", registry=registry)
    self.slots_total.set(slots)
    self.slots_used = prometheus_client.Gauge(
        "jaxllm_slots_in_use", "slots holding a live request", registry=registry)
    self.prompt_tokens = prometheus_client.Counter(
        "jaxllm_prompt_tokens", "prompt tokens prefilled", registry=registry)
    self.generated_tokens = prometheus_client.Counter(
        "jaxllm_generation_tokens", "tokens generated", registry=registry)
    self.finished = prometheus_client.Counter(
        "jaxllm_requests_finished", "requests finished", ["finish_reason"], registry=registry)
    self.ttft = prometheus_client.Histogram(
        "jaxllm_time_to_first_token_seconds", "from submission to the first token",
        registry=registry,
        buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120))
    self.tpot = prometheus_client.Histogram(
        "jaxllm_time_per_output_token_seconds", "between a request's successive tokens",
        registry=registry, buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
