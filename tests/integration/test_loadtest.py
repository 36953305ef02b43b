"""The load tester against the real server for a few seconds."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from dataclasses import replace

import pytest

from loadtest.runner import SLO, RunConfig, report, run
from loadtest.workload import WorkloadConfig, build_requests

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
        [sys.executable, "-m", "server.cli", "loadtest", "--url", server.url, "--rate", "2", "--duration", "2",
         "--prompt-len", "8", "--output-len", "4", "--slo", "ttft=60s", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=180)
    assert completed.returncode == 0, completed.stderr
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["completed"] >= 1 and result["failed"] == 0
    assert "p99_ttft_ms" in result and result["slo_met"] is True
    assert "SLO" in completed.stdout
