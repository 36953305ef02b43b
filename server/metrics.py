"""Prometheus collectors, named once and used by both front doors.

Names follow vLLM's style (``<prefix>:time_to_first_token_seconds`` ...) so existing dashboards
can read them. Buckets are fine around 10-500 ms, with an edge at 0.2 s for a 200 ms p99 target.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

PREFIX = "loraplex"
BASE_ADAPTER_LABEL = ""  # the `adapter` label value for requests to the base model

LATENCY_BUCKETS = (
    0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.125, 0.15, 0.175, 0.2, 0.25, 0.3,
    0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 60.0,
)
TOKEN_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
    0.2, 0.3, 0.5, 1.0, 2.5,
)

OUTCOMES = ("ok", "client_error", "not_found", "server_error", "aborted")


class Metrics:
    """All collectors live in one registry owned by the server (no global state)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        labels = ("model_name", "adapter")
        self.time_to_first_token = Histogram(
            f"{PREFIX}:time_to_first_token_seconds", "Time from request arrival to its first output token.",
            labels, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.e2e_request_latency = Histogram(
            f"{PREFIX}:e2e_request_latency_seconds", "Time from request arrival to its last output token.",
            labels, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.inter_token_latency = Histogram(
            f"{PREFIX}:inter_token_latency_seconds", "Time between consecutive streamed outputs.",
            labels, buckets=TOKEN_LATENCY_BUCKETS, registry=self.registry)
        self.requests = Counter(
            f"{PREFIX}:requests", "Finished requests by outcome.",
            (*labels, "outcome"), registry=self.registry)
        self.prompt_tokens = Counter(
            f"{PREFIX}:prompt_tokens", "Prompt tokens of admitted requests.", labels, registry=self.registry)
        self.generation_tokens = Counter(
            f"{PREFIX}:generation_tokens", "Generated tokens.", labels, registry=self.registry)
        self.num_requests_running = Gauge(
            f"{PREFIX}:num_requests_running", "Requests being generated now.",
            ("model_name",), registry=self.registry)

    def track_engine(self, num_unfinished_requests) -> None:
        """Export the engine's own count of unfinished requests, read at scrape time."""
        gauge = Gauge(f"{PREFIX}:engine_unfinished_requests", "Requests the engine holds (running or waiting).",
                      ("model_name",), registry=self.registry)
        gauge.labels(model_name=self.model_name).set_function(num_unfinished_requests)

    def _labels(self, adapter: str | None) -> dict[str, str]:
        return {"model_name": self.model_name, "adapter": adapter or BASE_ADAPTER_LABEL}

    def request_started(self) -> None:
        self.num_requests_running.labels(model_name=self.model_name).inc()

    def request_finished(self, adapter: str | None, outcome: str, *, ttft_s: float | None,
                         e2e_s: float, num_prompt_tokens: int, num_generated_tokens: int) -> None:
        self.num_requests_running.labels(model_name=self.model_name).dec()
        self.record_outcome(adapter, outcome)
        labels = self._labels(adapter)
        if ttft_s is not None:
            self.time_to_first_token.labels(**labels).observe(ttft_s)
        self.e2e_request_latency.labels(**labels).observe(e2e_s)
        self.prompt_tokens.labels(**labels).inc(num_prompt_tokens)
        self.generation_tokens.labels(**labels).inc(num_generated_tokens)

    def record_outcome(self, adapter: str | None, outcome: str) -> None:
        self.requests.labels(**self._labels(adapter), outcome=outcome).inc()

    def observe_inter_token(self, adapter: str | None, seconds: float) -> None:
        self.inter_token_latency.labels(**self._labels(adapter)).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
