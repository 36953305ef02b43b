"""Metrics pieces without a server: the adapter-label guard, the stats window, JSON logs."""

import json
import logging

import pytest
from prometheus_client.parser import text_string_to_metric_families

from loraplex.server.cli import JsonLogFormatter
from loraplex.server.metrics import FinishedRequest, Metrics, StatsWindow


def samples(metrics: Metrics, name: str) -> dict:
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            if sample.name == name:
                out[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_adapters_past_the_limit_fold_into_other():
    metrics = Metrics("base", max_adapter_labels=2)
    for adapter in ["a", "b", "c", "d", "a", None]:
        metrics.request_finished(adapter, "ok", ttft_s=0.1, e2e_s=0.5, num_prompt_tokens=3, num_generated_tokens=4)
    counts = {dict(k)["adapter"]: v for k, v in samples(metrics, "loraplex:e2e_request_latency_seconds_count").items()}
    assert counts == {"a": 2, "b": 1, "other": 2, "": 1}


def test_tpot_and_bucket_edge_at_200ms():
    metrics = Metrics("base")
    metrics.request_finished("a", "ok", ttft_s=0.2, e2e_s=1.2, num_prompt_tokens=3, num_generated_tokens=11)
    tpot = samples(metrics, "loraplex:request_time_per_output_token_seconds_sum")
    assert list(tpot.values()) == [0.1]
    buckets = samples(metrics, "loraplex:time_to_first_token_seconds_bucket")
    assert any(dict(k)["le"] == "0.2" and v == 1 for k, v in buckets.items())


def test_stats_window_summary_and_expiry():
    window = StatsWindow(window_s=10)
    for i in range(10):
        window.add(FinishedRequest(100.0 + i * 0.1, "a" if i % 2 else None, True, 0.01 * (i + 1), 0.5, 5))
    window.add(FinishedRequest(101.0, "a", False, None, 0.1, 0))
    summary = window.summary(now=101.0)
    assert summary["requests"] == 11 and summary["errors"] == 1
    assert summary["output_tokens_per_s"] == 5.0
    assert summary["adapters"]["a"]["requests"] == 6
    assert abs(summary["p50_ttft_ms"] - 55.0) < 1e-6
    assert window.summary(now=200.0)["requests"] == 0


def test_json_log_lines_carry_request_fields():
    record = logging.LogRecord("server.service", logging.INFO, "", 0, "request %s ok", ("r-1",), None)
    record.request_id = "r-1"
    record.adapter = "billing"
    line = json.loads(JsonLogFormatter().format(record))
    assert line["message"] == "request r-1 ok" and line["request_id"] == "r-1" and line["adapter"] == "billing"


def test_evictions_are_slots_that_left_the_cache_without_an_unload():
    """The engine reports its own evictions: slots that left its cache without our removing them."""
    import asyncio

    from loraplex.server.engine import Engine

    class FakeLLM:
        resident = {1, 2, 3}

        async def list_loras(self):
            return set(self.resident)

        async def remove_lora(self, slot):
            self.resident.discard(slot)

    class Version:
        def __init__(self, slot):
            self.adapter_slot = slot

    engine = _bookkeeping_only(Engine, FakeLLM())

    async def scenario():
        assert await engine.refresh_residency() == (3, 0)
        await engine.remove_adapter(Version(2))  # we removed 2 ourselves ...
        engine._llm.resident = {3, 4}  # ... and 1 was evicted by the engine's LRU
        return await engine.refresh_residency()

    num_resident, num_evicted = asyncio.run(scenario())
    assert (num_resident, num_evicted) == (2, 1)
    metrics = Metrics("base")
    metrics.adapter_states({"ready": 1}, num_resident, evictions=num_evicted)
    assert list(samples(metrics, "loraplex:adapter_evictions_total").values()) == [1.0]
    assert list(samples(metrics, "loraplex:adapters_resident").values()) == [2.0]


def _bookkeeping_only(engine_class, llm):
    engine = engine_class.__new__(engine_class)  # no vLLM: only the residency bookkeeping is under test
    engine._llm = llm
    engine._resident, engine._removed_since_refresh = set(), set()
    engine._loaded_before, engine._reloaded_since_refresh = {}, set()
    return engine


def test_only_an_adapters_first_load_is_a_separate_call_to_the_engine(tmp_path):
    """The first load is explicit and checked; after an eviction the step reloads the adapter
    (no extra round trip), and that reload is neither an eviction nor a hit. After an unload, or
    when the snapshot's files changed since, the next load is explicit (checked) again."""
    import asyncio

    from loraplex.server.adapters.store import SNAPSHOT_FILES
    from loraplex.server.engine import Engine

    class FakeLLM:
        def __init__(self):
            self.resident, self.add_calls = set(), []

        async def add_lora(self, request):
            self.add_calls.append(request.lora_int_id)
            self.resident.add(request.lora_int_id)

        async def list_loras(self):
            return set(self.resident)

        async def remove_lora(self, slot):
            self.resident.discard(slot)

    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    for name in SNAPSHOT_FILES:
        (snapshot / name).write_text("{}")

    class Version:
        def __init__(self, slot):
            self.adapter_slot, self.name, self.version, self.snapshot_path = slot, f"a{slot}", 1, snapshot

    llm = FakeLLM()
    engine = _bookkeeping_only(Engine, llm)

    async def evicted():
        llm.resident.clear()  # the engine's LRU evicted it
        await engine.refresh_residency()

    async def scenario():
        assert await engine.ensure_adapter(Version(5)) is False and llm.add_calls == [5]
        assert await engine.ensure_adapter(Version(5)) is True
        llm.resident.clear()
        assert await engine.refresh_residency() == (0, 1)
        assert await engine.ensure_adapter(Version(5)) is False and llm.add_calls == [5], "the step reloads it"
        assert await engine.refresh_residency() == (0, 0), "not scheduled yet: no eviction"
        await engine.remove_adapter(Version(5))
        assert await engine.ensure_adapter(Version(5)) is False and llm.add_calls == [5, 5], "explicit again"
        await evicted()
        (snapshot / SNAPSHOT_FILES[-1]).write_text("{} ")  # rewritten behind the store's back
        assert await engine.ensure_adapter(Version(5)) is False and llm.add_calls == [5, 5, 5], "checked again"
        await evicted()
        (snapshot / SNAPSHOT_FILES[-1]).unlink()
        assert await engine.ensure_adapter(Version(5)) is False and llm.add_calls == [5, 5, 5, 5]

    asyncio.run(scenario())


def test_text_log_lines_cannot_be_forged():
    from loraplex.server.cli import TextLogFormatter

    record = logging.LogRecord("uvicorn", logging.INFO, "p", 1, "GET %s", ("/v1/x\n2026-01-01 ERROR forged\x1b[2J",),
                               None)
    line = TextLogFormatter().format(record)
    assert "\n" not in line and "\x1b" not in line and "\\x0a2026" in line


def test_gateway_series_follow_the_model_server_protocol():
    """The inference extension's names: waiting counts the admission queue too; the LoRA info
    carries adapter names (never engine versions), is stamped with its update time, and lists
    adapters waiting for admission as waiting."""
    import time

    from loraplex.server.admission import BASE_MODEL_KEY, AdmissionStats
    from loraplex.server.engine import EngineStepStats, _adapter_names

    metrics = Metrics("base", max_loras=8)
    admission = AdmissionStats(running=3, queued=4, queued_per_adapter={"triage": 3, BASE_MODEL_KEY: 1})
    metrics.track_admission(lambda: admission)
    step = EngineStepStats(num_running=3, num_waiting=2, kv_cache_usage=0.25,
                           running_adapters=_adapter_names({"billing@v2": 1, "support@v1": 2}),
                           waiting_adapters=_adapter_names({"billing@v2": 1}))
    metrics.engine_step(step, [])
    before = time.time()
    assert list(samples(metrics, "vllm:num_requests_waiting").values()) == [6.0]  # 2 in the engine + 4 queued
    assert list(samples(metrics, "vllm:num_requests_running").values()) == [3.0]
    assert list(samples(metrics, "vllm:kv_cache_usage_perc").values()) == [0.25]
    assert list(samples(metrics, "loraplex:num_requests_waiting").values()) == [2.0]  # the engine's alone
    (labels, stamp), = samples(metrics, "vllm:lora_requests_info").items()
    assert dict(labels) == {"max_lora": "8", "running_lora_adapters": "billing,support",
                            "waiting_lora_adapters": "billing,triage"}
    assert before - 1 <= stamp <= time.time() + 1
    metrics.adapter_cache_lookup(True)
    metrics.adapter_cache_lookup(False)
    metrics.adapter_cache_lookup(False)
    assert list(samples(metrics, "loraplex:adapter_cache_hits_total").values()) == [1.0]
    assert list(samples(metrics, "loraplex:adapter_cache_misses_total").values()) == [2.0]


def test_a_shut_down_engine_lets_go_of_vllm_and_refuses_calls():
    """After shutdown the engine no longer holds vLLM's engine (collected then, not at the
    interpreter's exit, where its ``__del__`` printed a traceback); later calls are refused with
    ``EngineUnavailable``, and it reports itself unhealthy."""
    import asyncio
    import gc
    import weakref
    from concurrent.futures import ThreadPoolExecutor

    from loraplex.server.engine import Engine, EngineUnavailable

    class FakeLLM:
        errored = False
        shut_down = 0

        def shutdown(self):
            FakeLLM.shut_down += 1

    llm = FakeLLM()
    llm.cycle = llm  # as vLLM's: only the cycle collector frees it
    engine = _bookkeeping_only(Engine, llm)
    engine._checks = ThreadPoolExecutor(max_workers=1)
    engine._grammar_budget = None
    alive = weakref.ref(llm)
    del llm
    assert engine.healthy
    gc.disable()  # the collection must be the shutdown's own
    try:
        engine.shutdown()
        assert FakeLLM.shut_down == 1 and alive() is None
    finally:
        gc.enable()
    assert not engine.healthy and engine._llm.get_num_unfinished_requests() == 0
    assert not hasattr(engine._llm, "__deepcopy__")  # protocol lookups are plain AttributeErrors
    with pytest.raises(EngineUnavailable):
        asyncio.run(engine.remove_adapter(type("Version", (), {"adapter_slot": 1})()))
