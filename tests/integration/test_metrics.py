"""A real Prometheus scrape of the real server after real traffic."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.server import scrape

from .conftest import ADMIN_TOKEN, METRICS_MAX_ADAPTERS

pytestmark = pytest.mark.integration

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "loraplex-dashboard.json"


def values(samples, name: str, **labels) -> float:
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def by_label(samples, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for s in samples:
        if s.name == name:
            out[s.labels.get(label)] = out.get(s.labels.get(label), 0) + s.value
    return out


def test_request_counts_per_adapter_with_the_other_fold(server, client, adapter_names):
    count = "loraplex:e2e_request_latency_seconds_count"
    before = by_label(scrape(server), count, "adapter")
    sent = {name: i + 1 for i, name in enumerate(adapter_names)}  # 1, 2, ... requests per adapter
    for name, n in sent.items():
        for _ in range(n):
            client.completions.create(model=name, prompt="Hi", max_tokens=2)
    after = by_label(scrape(server), count, "adapter")
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    named = [a for a in after if a not in ("", "other")]
    assert len(named) <= METRICS_MAX_ADAPTERS and "other" in after
    assert sum(delta.values()) == sum(sent.values())
    for name in named:
        assert delta[name] == sent.get(name, 0)
    assert delta["other"] == sum(n for name, n in sent.items() if name not in named)


def test_ttft_never_exceeds_e2e_bucket_by_bucket(server, client, base_model_name):
    for _ in range(3):
        client.completions.create(model=base_model_name, prompt="Hello", max_tokens=4)
    samples = scrape(server)
    ttft = {s.labels["le"]: s.value for s in samples
            if s.name == "loraplex:time_to_first_token_seconds_bucket" and s.labels["adapter"] == ""}
    e2e = {s.labels["le"]: s.value for s in samples
           if s.name == "loraplex:e2e_request_latency_seconds_bucket" and s.labels["adapter"] == ""}
    assert ttft and ttft.keys() == e2e.keys()
    for le in ttft:  # every request's TTFT <= its e2e, so TTFT's cumulative counts dominate
        assert ttft[le] >= e2e[le]
    assert values(samples, "loraplex:time_to_first_token_seconds_sum", adapter="") <= values(
        samples, "loraplex:e2e_request_latency_seconds_sum", adapter="")


def test_failures_are_counted_by_reason(server, client, base_model_name):
    before = scrape(server)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="missing-adapter", prompt="Hi", max_tokens=2)
    for _ in range(2):
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=base_model_name, prompt="Hi", max_tokens=2, temperature=9)
    after = scrape(server)
    name = "loraplex:requests_total"
    assert values(after, name, outcome="rejected_404") - values(before, name, outcome="rejected_404") == 1
    assert values(after, name, outcome="rejected_400") - values(before, name, outcome="rejected_400") == 2


def test_a_load_failure_shows_in_the_adapter_metrics(server, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 999}))
    (bad / "adapter_model.safetensors").write_bytes(b"")
    name = "loraplex:adapter_loads_total"
    before = values(scrape(server), name, result="failed", reason="invalid_adapter")
    response = httpx.post(f"{server.url}/v1/load_lora_adapter",
                          json={"lora_name": "bad-metrics", "lora_path": str(bad)},
                          headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
    assert response.status_code == 400
    assert values(scrape(server), name, result="failed", reason="invalid_adapter") == before + 1
    samples = scrape(server)
    assert values(samples, "loraplex:adapter_load_seconds_count") >= 9  # the start-up loads
    deadline = time.monotonic() + 5
    while values(samples, "loraplex:adapters", state="ready") < 9 and time.monotonic() < deadline:
        time.sleep(0.5)
        samples = scrape(server)
    assert values(samples, "loraplex:adapters", state="ready") >= 9
    assert values(samples, "loraplex:adapters_resident", tier="cpu") >= 1


def test_engine_gauges_and_lora_requests_info(server, client, adapter_names):
    client.completions.create(model=adapter_names[0], prompt="Hi", max_tokens=2)
    samples = scrape(server)
    info = [s for s in samples if s.name == "vllm:lora_requests_info"]
    assert len(info) == 1 and info[0].labels["max_lora"] == "4"
    assert {"running_lora_adapters", "waiting_lora_adapters"} <= set(info[0].labels)
    assert values(samples, "loraplex:request_prefill_time_seconds_count") > 0
    assert values(samples, "loraplex:request_queue_time_seconds_count") > 0
    assert any(s.name == "loraplex:kv_cache_usage_perc" for s in samples)


def test_gateway_metrics_follow_the_model_server_protocol(server, client, adapter_names):
    """What the inference extension's endpoint picker and llm-d's LoRA-affinity scorer read, with
    their default names: one gauge series each, the LoRA info stamped with its update time and
    naming adapters as clients name them (the model field), never engine versions."""
    import threading

    from prometheus_client.parser import text_string_to_metric_families

    from tests.support.server import wait_for

    adapter = adapter_names[6]
    lookups = ("loraplex:adapter_cache_hits_total", "loraplex:adapter_cache_misses_total")
    before = sum(values(scrape(server), name) for name in lookups)
    streaming = threading.Thread(target=lambda: list(client.completions.create(
        model=adapter, prompt="Count slowly:", max_tokens=48, stream=True,
        extra_body={"ignore_eos": True})))
    streaming.start()
    seen: dict = {}

    def adapter_is_running() -> bool:
        families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)}
        seen.update(families)
        (info,) = families["vllm:lora_requests_info"].samples
        return adapter in info.labels["running_lora_adapters"].split(",")

    try:
        assert wait_for(adapter_is_running, timeout=60), "the running adapter never showed in vllm:lora_requests_info"
    finally:
        streaming.join()
    for name in ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc"):
        family = seen[name]
        assert family.type == "gauge" and len(family.samples) == 1, name
        assert family.samples[0].value >= 0
    assert seen["vllm:num_requests_running"].samples[0].value >= 1
    assert 0 < seen["vllm:kv_cache_usage_perc"].samples[0].value <= 1
    (info,) = seen["vllm:lora_requests_info"].samples
    assert seen["vllm:lora_requests_info"].type == "gauge"
    assert abs(info.value - time.time()) < 60  # a timestamp, so the picker takes the latest
    assert info.labels["max_lora"] == "4"
    for listed in ("running_lora_adapters", "waiting_lora_adapters"):
        names = [n for n in info.labels[listed].split(",") if n]
        assert set(names) <= set(adapter_names) and "@" not in info.labels[listed], info.labels
    assert sum(values(scrape(server), name) for name in lookups) == before + 1


def test_stats_summary(server, client, base_model_name):
    client.completions.create(model=base_model_name, prompt="Hi", max_tokens=3)
    stats = httpx.get(f"{server.url}/v1/stats").json()
    assert stats["requests"] >= 1 and stats["requests_per_s"] > 0
    assert 0 < stats["p50_ttft_ms"] <= stats["p99_e2e_ms"]
    assert stats["adapters"][""]["requests"] >= 1


def test_every_dashboard_metric_exists_in_a_real_scrape(server, client, base_model_name):
    client.completions.create(model=base_model_name, prompt="Hi", max_tokens=2)
    # a streamed answer of several tokens, so inter-token latency has an observation of its own
    list(client.completions.create(model=base_model_name, prompt="Hi", max_tokens=4, stream=True,
                                   extra_body={"ignore_eos": True}))
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    wanted = {m for e in exprs for m in re.findall(r"(?:loraplex|vllm):[a-z0-9_]+", e)}
    assert len(wanted) >= 12
    scraped = {s.name for s in scrape(server)}
    missing = sorted(m for m in wanted if m not in scraped)
    assert not missing, f"dashboard queries metrics the server does not export: {missing}"
