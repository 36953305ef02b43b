"""Admission control, drain and engine failure against real servers of their own (small limits,
and servers these tests end): shedding with 429 / RESOURCE_EXHAUSTED and Retry-After, client
deadlines, SIGTERM draining without losing an admitted request, and an engine fault reported
rather than hung on."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplex.server.grpc_gen import loraplex_pb2 as pb
from loraplex.server.grpc_gen import loraplex_pb2_grpc as pb_grpc
from tests.support.server import RunningServer, alive, scrape, start_server, wait_for

pytestmark = pytest.mark.integration

MAX_CONCURRENT, MAX_QUEUED = 2, 2


def start_small_server(tmp_path_factory, cache_dir: Path, name: str, *extra: str) -> RunningServer:
    log_path = tmp_path_factory.mktemp(name) / "server.log"
    return start_server(
        ["--cache-dir", str(cache_dir), "--dtype", "float32", "--kv-cache-gib", "1", "--max-model-len", "512",
         "--max-loras", "1", "--max-cpu-loras", "1", "--max-concurrent", str(MAX_CONCURRENT),
         "--max-queued", str(MAX_QUEUED), *extra], log_path)


def complete(server: RunningServer, model: str, max_tokens: int = 24, headers: dict | None = None,
             timeout: float = 120) -> tuple[int, dict, float, dict]:
    """(status, body, seconds, response headers) of one non-streamed completion."""
    started = time.monotonic()
    response = httpx.post(f"{server.url}/v1/completions", timeout=timeout, headers=headers or {},
                          json={"model": model, "prompt": "Count slowly: one, two,", "max_tokens": max_tokens,
                                "temperature": 0, "ignore_eos": True})
    return response.status_code, response.json(), time.monotonic() - started, dict(response.headers)


def outcome_counts(server: RunningServer) -> dict[str, float]:
    counts: dict[str, float] = {}
    for sample in scrape(server):
        if sample.name == "loraplex:requests_total":
            counts[sample.labels["outcome"]] = counts.get(sample.labels["outcome"], 0) + sample.value
    return counts


@pytest.fixture(scope="module")
def small_server(tmp_path_factory, cache_dir, base_model_dir):
    running = start_small_server(tmp_path_factory, cache_dir, "admission", "--drain-timeout", "120")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def model(small_server) -> str:
    return httpx.get(f"{small_server.url}/v1/models").json()["data"][0]["id"]


def test_overload_is_shed_at_once_with_retry_after_and_admitted_requests_succeed(small_server, model):
    num_requests = 4 * (MAX_CONCURRENT + MAX_QUEUED)
    with ThreadPoolExecutor(num_requests) as pool:
        results = list(pool.map(lambda _: complete(small_server, model), range(num_requests)))
    ok = [r for r in results if r[0] == 200]
    shed = [r for r in results if r[0] == 429]
    assert len(ok) + len(shed) == num_requests, [r[:2] for r in results if r[0] not in (200, 429)]
    assert MAX_CONCURRENT + MAX_QUEUED <= len(ok) < num_requests and shed
    for _, body, seconds, headers in shed:
        assert body["error"]["type"] == "rate_limit_exceeded" and "overloaded" in body["error"]["message"]
        assert int(headers["retry-after"]) >= 1
        assert seconds < min(r[2] for r in ok)  # refused at once, not after waiting
    assert all(r[1]["usage"]["completion_tokens"] == 24 for r in ok)
    assert outcome_counts(small_server).get("shed", 0) >= len(shed)


def test_deadline_that_cannot_be_met_is_refused_at_once(small_server, model):
    assert complete(small_server, model, max_tokens=4)[0] == 200  # the server now knows its service time
    with ThreadPoolExecutor(MAX_CONCURRENT) as pool:
        busy = [pool.submit(complete, small_server, model, 48) for _ in range(MAX_CONCURRENT)]
        time.sleep(0.5)
        status, body, seconds, headers = complete(small_server, model, headers={"x-request-timeout": "0.2"})
        assert status == 429 and "deadline" in body["error"]["message"] and seconds < 1.0
        assert "retry-after" in headers
        assert all(f.result()[0] == 200 for f in busy)
    status, body, _, _ = complete(small_server, model, headers={"x-request-timeout": "soon"})
    assert status == 400 and body["error"]["param"] == "x-request-timeout"
    assert complete(small_server, model, max_tokens=4, headers={"x-request-timeout": "60"})[0] == 200


def test_grpc_overload_is_resource_exhausted_with_retry_after(small_server, model):
    request = pb.GenerateRequest(model=model, text="Count slowly: one, two,",
                                 sampling=pb.SamplingParameters(max_tokens=24, temperature=0.0))

    async def one(stub):
        try:
            await stub.Generate(request)
            return grpc.StatusCode.OK, {}
        except grpc.aio.AioRpcError as exc:
            return exc.code(), dict(exc.trailing_metadata() or ())

    async def scenario():
        async with grpc.aio.insecure_channel(small_server.grpc_target) as channel:
            stub = pb_grpc.GenerationStub(channel)
            return await asyncio.gather(*[one(stub) for _ in range(4 * (MAX_CONCURRENT + MAX_QUEUED))])

    results = asyncio.run(scenario())
    codes = [code for code, _ in results]
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    assert all(int(meta["retry-after"]) >= 1 for code, meta in results if code != grpc.StatusCode.OK)


def grpc_health(server: RunningServer) -> int:
    async def check():
        async with grpc.aio.insecure_channel(server.grpc_target) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
            return reply.status

    return asyncio.run(check())


def test_sigterm_drains_admitted_requests_then_exits_cleanly(small_server, model):
    """Last in this module: it ends the server."""
    admitted = MAX_CONCURRENT + MAX_QUEUED
    with ThreadPoolExecutor(admitted) as pool:
        futures = [pool.submit(complete, small_server, model, 32) for _ in range(admitted)]
        assert wait_for(lambda: admitted_now(small_server) == admitted), "requests were not all admitted"
        children = small_server.descendants()
        small_server.process.send_signal(signal.SIGTERM)
        assert wait_for(lambda: httpx.get(f"{small_server.url}/health").status_code == 503)
        health = httpx.get(f"{small_server.url}/health")
        assert health.status_code == 503 and "draining" in health.json()["error"]["message"]
        assert grpc_health(small_server) == health_pb2.HealthCheckResponse.NOT_SERVING
        late = complete(small_server, model, max_tokens=4)
        assert late[0] == 503 and "shutting down" in late[1]["error"]["message"]
        results = [f.result() for f in futures]
    assert [r[0] for r in results] == [200] * admitted, [r[1] for r in results]
    assert all(r[1]["usage"]["completion_tokens"] == 32 for r in results)
    assert small_server.process.wait(120) == 0, small_server.log_tail()
    assert wait_for(lambda: not alive(children), timeout=10), "engine processes outlived the server"
    assert "drained" in small_server.log_path.read_text()


def admitted_now(server: RunningServer) -> float:
    """Requests admission holds (running + queued), from a real /metrics scrape."""
    return sum(s.value for s in scrape(server)
               if s.name in ("loraplex:admission_running", "loraplex:admission_queued"))


def engine_core_pid(server: RunningServer) -> int:
    for pid in server.descendants():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            comm = Path(f"/proc/{pid}/comm").read_text()
        except OSError:
            continue
        if b"EngineCore" in cmdline or "EngineCore" in comm:
            return pid
    raise AssertionError("no engine core process found")


def test_engine_failure_is_reported_not_hung_on(tmp_path_factory, cache_dir, base_model_dir):
    server = start_small_server(tmp_path_factory, cache_dir, "fault")
    try:
        model = httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(complete, server, model, 400, None, 60)
            time.sleep(1.5)
            os.kill(engine_core_pid(server), signal.SIGKILL)
            status, body, seconds, _ = in_flight.result()
        assert status == 503 and "engine" in body["error"]["message"], body
        deadline = time.monotonic() + 10
        while httpx.get(f"{server.url}/health").status_code != 503 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert httpx.get(f"{server.url}/health").status_code == 503
        time.sleep(1.5)
        assert grpc_health(server) == health_pb2.HealthCheckResponse.NOT_SERVING
        status, body, seconds, _ = complete(server, model, max_tokens=4, timeout=30)
        assert status == 503 and seconds < 5
    finally:
        server.stop(timeout=60)
