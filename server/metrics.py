"""Prometheus collectors, named once and used by both front doors.

Names follow vLLM's style (``loraplex:time_to_first_token_seconds`` ...) so existing dashboards
can read them. For the Gateway API inference extension's endpoint picker (and llm-d's LoRA-affinity
scorer) the model-server protocol's names are exported as vLLM spells them:
``vllm:num_requests_waiting`` (the engine's queue plus loraplex's admission queue),
``vllm:num_requests_running``, ``vllm:kv_cache_usage_perc`` (0-1) and ``vllm:lora_requests_info``
(value: when it was updated; labels ``max_lora``, ``running_lora_adapters``,
``waiting_lora_adapters``, adapter names comma-separated), computed at scrape time from the
engine's last step and the admission queue as it is then (nothing extra per engine step).
Buckets are fine around 10-500 ms, with an edge at 0.2 s for a 200 ms p99 target.

Per-adapter series carry an ``adapter`` label ("" = the base model). A cardinality guard keeps
at most ``max_adapter_labels`` adapters under their own name (the first ones to get traffic);
the rest fold into ``other``.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .admission import BASE_MODEL_KEY
from .stats import percentile

GATEWAY_PREFIX = "vllm"  # the names endpoint pickers read by default

PREFIX = "loraplex"
BASE_ADAPTER_LABEL = ""  # the `adapter` label value for requests to the base model
OTHER_ADAPTERS_LABEL = "other"

LATENCY_BUCKETS = (
    0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.125, 0.15, 0.175, 0.2, 0.25, 0.3,
    0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 60.0,
)
TOKEN_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
    0.2, 0.3, 0.5, 1.0, 2.5,
)


class AdapterLabels:
    """Adapter name -> label value, with at most ``max_labels`` distinct adapter names."""

    def __init__(self, max_labels: int) -> None:
        self.max_labels = max_labels
        self._named: set[str] = set()

    def __call__(self, adapter: str | None) -> str:
        if not adapter:
            return BASE_ADAPTER_LABEL
        if adapter in self._named:
            return adapter
        if len(self._named) < self.max_labels:
            self._named.add(adapter)
            return adapter
        return OTHER_ADAPTERS_LABEL


@dataclass
class FinishedRequest:
    finished_at: float
    adapter: str | None
    ok: bool
    ttft_s: float | None
    e2e_s: float
    num_generated: int


class StatsWindow:
    """Finished requests of the last ``window_s`` seconds, summarised for ``/v1/stats``."""

    def __init__(self, window_s: float = 60.0) -> None:
        self.window_s = window_s
        self._items: deque[FinishedRequest] = deque()

    def add(self, item: FinishedRequest) -> None:
        self._items.append(item)
        self._trim(item.finished_at)

    def _trim(self, now: float) -> None:
        while self._items and self._items[0].finished_at < now - self.window_s:
            self._items.popleft()

    def summary(self, now: float | None = None) -> dict:
        now = time.monotonic() if now is None else now
        self._trim(now)
        items = list(self._items)
        by_adapter: dict[str, list[FinishedRequest]] = {}
        for item in items:
            by_adapter.setdefault(item.adapter or BASE_ADAPTER_LABEL, []).append(item)
        return {"window_s": self.window_s, **_summarise(items, self.window_s),
                "adapters": {name: _summarise(group, self.window_s) for name, group in sorted(by_adapter.items())}}


def _percentile(values: list[float], q: float) -> float | None:
    """The load tester's percentile (same interpolation), None instead of NaN when empty (JSON)."""
    return percentile(values, q) if values else None


def _summarise(items: list[FinishedRequest], window_s: float) -> dict:
    ok = [i for i in items if i.ok]
    ttft = [i.ttft_s for i in ok if i.ttft_s is not None]
    e2e = [i.e2e_s for i in ok]
    ms = lambda v: None if v is None else 1000 * v  # noqa: E731
    return {"requests": len(items), "errors": len(items) - len(ok),
            "requests_per_s": len(items) / window_s,
            "output_tokens_per_s": sum(i.num_generated for i in ok) / window_s,
            "p50_ttft_ms": ms(_percentile(ttft, 50)), "p99_ttft_ms": ms(_percentile(ttft, 99)),
            "p50_e2e_ms": ms(_percentile(e2e, 50)), "p99_e2e_ms": ms(_percentile(e2e, 99))}


class Metrics:
    """All collectors live in one registry owned by the server (no global state)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str, max_adapter_labels: int = 32, max_loras: int = 0) -> None:
        self.model_name = model_name
        self.max_loras = max_loras
        self.adapter_label = AdapterLabels(max_adapter_labels)
        self.window = StatsWindow()
        self.registry = r = CollectorRegistry()
        labels = ("model_name", "adapter")
        model = ("model_name",)

        def histogram(name, doc, label_names=labels, buckets=LATENCY_BUCKETS):
            return Histogram(f"{PREFIX}:{name}", doc, label_names, buckets=buckets, registry=r)

        self.time_to_first_token = histogram("time_to_first_token_seconds",
                                             "Time from request arrival to its first output token.")
        self.e2e_request_latency = histogram("e2e_request_latency_seconds",
                                             "Time from request arrival to its last output token.")
        self.inter_token_latency = histogram("inter_token_latency_seconds", "Time between consecutive streamed "
                                             "outputs.", buckets=TOKEN_LATENCY_BUCKETS)
        self.time_per_output_token = histogram("request_time_per_output_token_seconds", "Per request: "
                                               "(e2e - TTFT) / (output tokens - 1).", buckets=TOKEN_LATENCY_BUCKETS)
        self.admission_wait = histogram("admission_wait_seconds", "Time a request waited for admission (loraplex's "
                                        "queue, before the engine's).")
        self.queue_time = histogram("request_queue_time_seconds", "Time a request waited in the engine's queue.",
                                    model)
        self.prefill_time = histogram("request_prefill_time_seconds", "Engine time of a request's prefill.", model)
        self.decode_time = histogram("request_decode_time_seconds", "Engine time of a request's decode.", model)
        self.requests = Counter(f"{PREFIX}:requests", "Requests by outcome: ok, aborted, shed (refused by "
                                "admission control), rejected_<status> (refused before the engine), "
                                "failed_<status> (failed in it).",
                                (*labels, "outcome"), registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}:prompt_tokens", "Prompt tokens of admitted requests.", labels,
                                     registry=r)
        self.generation_tokens = Counter(f"{PREFIX}:generation_tokens", "Generated tokens.", labels, registry=r)
        self.num_requests_running = Gauge(f"{PREFIX}:num_requests_running", "Requests the engine is running.",
                                          model, registry=r)
        self.num_requests_waiting = Gauge(f"{PREFIX}:num_requests_waiting", "Requests waiting in the engine.",
                                          model, registry=r)
        self.kv_cache_usage = Gauge(f"{PREFIX}:kv_cache_usage_perc", "KV cache usage, 0 to 1.", model, registry=r)
        self.gateway_running = Gauge(f"{GATEWAY_PREFIX}:num_requests_running", "Requests the engine is running "
                                     "(the model-server protocol's name).", model, registry=r)
        self.gateway_waiting = Gauge(f"{GATEWAY_PREFIX}:num_requests_waiting", "Requests waiting: in the engine's "
                                     "queue and in loraplex's admission queue.", model, registry=r)
        self.gateway_kv_cache_usage = Gauge(f"{GATEWAY_PREFIX}:kv_cache_usage_perc", "KV cache usage, 0 to 1 (the "
                                            "model-server protocol's name).", model, registry=r)
        self.lora_requests_info = Gauge(
            f"{GATEWAY_PREFIX}:lora_requests_info", "Adapters of running and waiting requests (value: when this "
            "was updated, Unix seconds), as vLLM exports it.",
            ("running_lora_adapters", "waiting_lora_adapters", "max_lora"), registry=r)
        self.adapter_cache_hits = Counter(f"{PREFIX}:adapter_cache_hits", "Requests whose adapter was already in "
                                          "the engine's adapter cache.", registry=r)
        self.adapter_cache_misses = Counter(f"{PREFIX}:adapter_cache_misses", "Requests whose adapter had to be "
                                            "loaded into the engine's adapter cache first.", registry=r)
        self._last_step = None  # the engine's last EngineStepStats
        self._admission_stats = None  # () -> AdmissionStats
        self.adapter_loads = Counter(f"{PREFIX}:adapter_loads", "Adapter loads by result and failure reason.",
                                     ("result", "reason"), registry=r)
        self.adapter_load_latency = Histogram(f"{PREFIX}:adapter_load_seconds", "Time to validate and load an "
                                              "adapter into the engine.", buckets=LATENCY_BUCKETS, registry=r)
        self.adapter_evictions = Counter(f"{PREFIX}:adapter_evictions", "Adapters the engine's LRU cache "
                                         "dropped (they reload from disk on their next request).", registry=r)
        self.stalled_streams = Counter(f"{PREFIX}:stalled_streams", "Streams cut off because the client read "
                                       "nothing for --stream-send-timeout (its engine request aborted).", registry=r)
        self.adapter_unloads = Counter(f"{PREFIX}:adapter_unloads", "Adapters unloaded or replaced.", registry=r)
        self.adapters = Gauge(f"{PREFIX}:adapters", "Registered adapters by state.", ("state",), registry=r)
        self.adapters_resident = Gauge(f"{PREFIX}:adapters_resident", "Adapters loaded in the engine, by tier "
                                       "(cpu: its adapter cache; device: in the batch slots now).", ("tier",),
                                       registry=r)
        for name in (self.num_requests_running, self.num_requests_waiting, self.kv_cache_usage,
                     self.gateway_running, self.gateway_waiting, self.gateway_kv_cache_usage):
            name.labels(model_name=model_name).set(0)

    def track_engine(self, num_unfinished_requests) -> None:
        """Export the engine's own count of unfinished requests, read at scrape time."""
        gauge = Gauge(f"{PREFIX}:engine_unfinished_requests", "Requests the engine holds (running or waiting).",
                      ("model_name",), registry=self.registry)
        gauge.labels(model_name=self.model_name).set_function(num_unfinished_requests)

    def _labels(self, adapter: str | None) -> dict[str, str]:
        return {"model_name": self.model_name, "adapter": self.adapter_label(adapter)}

    # -- requests ------------------------------------------------------------------------------
    def request_finished(self, adapter: str | None, outcome: str, *, ttft_s: float | None, e2e_s: float,
                         num_prompt_tokens: int, num_generated_tokens: int) -> None:
        """Latency histograms count successful requests only; every request counts by outcome."""
        self.record_outcome(adapter, outcome)
        labels = self._labels(adapter)
        self.prompt_tokens.labels(**labels).inc(num_prompt_tokens)
        self.generation_tokens.labels(**labels).inc(num_generated_tokens)
        self.window.add(FinishedRequest(time.monotonic(), adapter, outcome == "ok", ttft_s, e2e_s,
                                        num_generated_tokens))
        if outcome != "ok":
            return
        if ttft_s is not None:
            self.time_to_first_token.labels(**labels).observe(ttft_s)
            if num_generated_tokens > 1:
                self.time_per_output_token.labels(**labels).observe((e2e_s - ttft_s) / (num_generated_tokens - 1))
        self.e2e_request_latency.labels(**labels).observe(e2e_s)

    def record_outcome(self, adapter: str | None, outcome: str) -> None:
        self.requests.labels(**self._labels(adapter), outcome=outcome).inc()

    def observe_admission_wait(self, adapter: str | None, seconds: float) -> None:
        self.admission_wait.labels(**self._labels(adapter)).observe(seconds)

    def track_admission(self, admission_stats) -> None:
        """Export admission control's running and queued counts, read at scrape time;
        ``admission_stats()`` returns an ``AdmissionStats``."""
        self._admission_stats = admission_stats
        for name, doc, read in (("admission_running", "Requests admitted and not finished.", "running"),
                                ("admission_queued", "Requests waiting for admission.", "queued")):
            gauge = Gauge(f"{PREFIX}:{name}", doc, ("model_name",), registry=self.registry)
            gauge.labels(model_name=self.model_name).set_function(lambda read=read: getattr(admission_stats(), read))

    def observe_inter_token(self, adapter: str | None, seconds: float) -> None:
        self.inter_token_latency.labels(**self._labels(adapter)).observe(seconds)

    # -- engine --------------------------------------------------------------------------------
    def engine_step(self, step, finished) -> None:
        """Called after every engine step with ``EngineStepStats`` (or None) and finished timings."""
        model = {"model_name": self.model_name}
        for timing in finished:
            self.queue_time.labels(**model).observe(timing.queued_s)
            self.prefill_time.labels(**model).observe(timing.prefill_s)
            self.decode_time.labels(**model).observe(timing.decode_s)
        if step is None:
            return
        self.num_requests_running.labels(**model).set(step.num_running)
        self.num_requests_waiting.labels(**model).set(step.num_waiting)
        self.kv_cache_usage.labels(**model).set(step.kv_cache_usage)
        self.adapters_resident.labels(tier="device").set(len(step.running_adapters))
        self._last_step = step  # the gateway series are computed from it at scrape time

    def _refresh_gateway(self) -> None:
        """The model-server protocol's series, from the engine's last step and admission now."""
        step = self._last_step
        running = step.num_running if step else 0
        running_adapters = step.running_adapters if step else []
        waiting = step.num_waiting if step else 0
        waiting_adapters = set(step.waiting_adapters if step else ())
        if self._admission_stats is not None:
            admission = self._admission_stats()
            waiting += admission.queued
            waiting_adapters.update(name for name, n in admission.queued_per_adapter.items()
                                    if n and name != BASE_MODEL_KEY)
        model = {"model_name": self.model_name}
        self.gateway_running.labels(**model).set(running)
        self.gateway_waiting.labels(**model).set(waiting)
        self.gateway_kv_cache_usage.labels(**model).set(step.kv_cache_usage if step else 0.0)
        self.lora_requests_info.clear()
        self.lora_requests_info.labels(running_lora_adapters=",".join(running_adapters),
                                       waiting_lora_adapters=",".join(sorted(waiting_adapters)),
                                       max_lora=str(self.max_loras)).set(time.time())

    def adapter_cache_lookup(self, hit: bool) -> None:
        (self.adapter_cache_hits if hit else self.adapter_cache_misses).inc()

    # -- adapters ------------------------------------------------------------------------------
    def adapter_loaded(self, seconds: float) -> None:
        self.adapter_loads.labels(result="ok", reason="").inc()
        self.adapter_load_latency.observe(seconds)

    def adapter_load_failed(self, reason: str) -> None:
        self.adapter_loads.labels(result="failed", reason=reason).inc()

    def adapter_states(self, counts: dict[str, int], resident_cpu: int | None = None, evictions: int = 0) -> None:
        self.adapter_evictions.inc(evictions)
        for state in ("loading", "ready", "failed", "unloading"):
            self.adapters.labels(state=state).set(counts.get(state, 0))
        if resident_cpu is not None:
            self.adapters_resident.labels(tier="cpu").set(resident_cpu)

    def render(self) -> bytes:
        self._refresh_gateway()
        return generate_latest(self.registry)
