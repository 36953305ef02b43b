"""The load tester against the real server for a few seconds."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from dataclasses import replace

import pytest

from loraplex.loadtest.runner import SLO, RunConfig, report, run
from loraplex.loadtest.workload import WorkloadConfig, build_requests

pytestmark = pytest.mark.integration


def test_counts_percentiles_and_slo_verdict(server, base_model_name, adapter_names):
    workload = WorkloadConfig(models=(base_model_name, *adapter_names[:3]), rate=3.0, num_requests=20, seed=1,
                              prompt_len=(8, 16), output_len=(4, 4))
    config = RunConfig(url=server.url, workload=workload, duration_s=3.0)
    results = asyncio.run(run(config))
    expected = [s for s in build_requests(workload) if s.send_at <= 3.0]
    assert len(results) == len(expected)
    result = report(results, config)
    assert result["completed"] == len(expected) and result["failed"] == 0
    assert result["total_output_tokens"] == 4 * len(expected)
    assert sum(m["completed"] for m in result["per_model"].values()) == len(expected)
    assert 0 < result["median_ttft_ms"] <= result["p99_ttft_ms"] <= result["p99_e2el_ms"]
    p99_ttft_s = result["p99_ttft_ms"] / 1000
    assert report(results, replace(config, slo=SLO(ttft_s=2 * p99_ttft_s)))["slo_met"] is True
    assert report(results, replace(config, slo=SLO(ttft_s=p99_ttft_s / 2)))["slo_met"] is False


def test_cli_writes_a_result_file(server, tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "loraplex.server.cli", "loadtest", "--url", server.url, "--rate", "2", "--duration", "2",
         "--prompt-len", "8", "--output-len", "4", "--slo", "ttft=60s", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=180)
    assert completed.returncode == 0, completed.stderr
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["completed"] >= 1 and result["failed"] == 0
    assert "p99_ttft_ms" in result and result["slo_met"] is True
    assert "SLO" in completed.stdout


def test_capacity_search_compare_and_closed_loop(server, base_model_name, tmp_path):
    from PIL import Image

    common = [sys.executable, "-m", "loraplex.server.cli", "loadtest", "--url", server.url, "--duration", "2",
              "--prompt-len", "8", "--output-len", "2", "--models", base_model_name]
    capacity = subprocess.run([*common, "--find-capacity", "--rate", "4", "--rate-min", "1", "--search-steps", "1",
                               "--slo", "ttft=60s", "--out", str(tmp_path / "cap")],
                              capture_output=True, text=True, timeout=300)
    assert capacity.returncode == 0, capacity.stderr
    summary = json.loads((tmp_path / "cap" / "capacity.json").read_text())
    assert summary["capacity_rate"] == 4  # a 60 s TTFT SLO holds at the highest rate tried
    with Image.open(tmp_path / "cap" / "latency_vs_rate.png") as image:
        assert image.format == "PNG"

    compared = subprocess.run([*common, "--rate", "2", "--compare", server.url, "--out", str(tmp_path / "cmp")],
                              capture_output=True, text=True, timeout=300)
    assert compared.returncode == 0, compared.stderr
    ratios = json.loads((tmp_path / "cmp" / "compare.json").read_text())["ratios"]
    assert set(ratios) >= {"request_throughput", "p99_ttft_ms"}
    assert "second/first" in compared.stdout

    closed = subprocess.run([*common, "--rate", "1", "--concurrency", "2", "--out", str(tmp_path / "closed")],
                            capture_output=True, text=True, timeout=300)
    assert closed.returncode == 0, closed.stderr
    result = json.loads((tmp_path / "closed" / "result.json").read_text())
    assert result["max_concurrency"] == 2 and result["completed"] >= 2 and result["failed"] == 0


def test_grpc_target(server, base_model_name, adapter_names):
    workload = WorkloadConfig(models=(base_model_name, adapter_names[0]), rate=3.0, num_requests=10, seed=3,
                              prompt_len=(8, 8), output_len=(3, 3))
    config = RunConfig(url=f"grpc://{server.grpc_target}", workload=workload, duration_s=2.0)
    results = asyncio.run(run(config))
    result = report(results, config)
    assert result["completed"] == len(results) >= 2 and result["failed"] == 0
    assert result["total_output_tokens"] == 3 * len(results)
    assert result["p99_ttft_ms"] <= result["p99_e2el_ms"]


def test_chat_api_mode(server, base_model_name):
    workload = WorkloadConfig(models=(base_model_name,), rate=3.0, num_requests=8, seed=4, prompt_len=(4, 6),
                              output_len=(3, 3), api="chat")
    config = RunConfig(url=server.url, workload=workload, duration_s=2.0)
    results = asyncio.run(run(config))
    result = report(results, config)
    assert result["completed"] == len(results) >= 2 and result["failed"] == 0
    assert all(r.ttft_s is not None for r in results)
    assert result["total_output_tokens"] == 3 * len(results)
