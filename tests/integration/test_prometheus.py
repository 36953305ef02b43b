"""deploy/prometheus/prometheus.yml scraping the real server: a real Prometheus (the system's
package) on loopback, with the compose config's target pointed at the test server, answers a
query for the TTFT histogram with data."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support.server import free_port

pytestmark = pytest.mark.integration

CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "prometheus.yml"


def test_compose_prometheus_config_scrapes_ttft_histogram(tmp_path, server, client, base_model_name):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed (deploy/install.sh installs it as root with apt-get)")
    client.completions.create(model=base_model_name, prompt="Hello", max_tokens=2, temperature=0)
    config = yaml.safe_load(CONFIG.read_text())
    config["global"]["scrape_interval"] = "1s"
    config["scrape_configs"][0]["static_configs"][0]["targets"] = [f"127.0.0.1:{server.port}"]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (tmp_path / "prometheus.log").open("w")
    prometheus = subprocess.Popen(
        [binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    try:
        query = 'sum(loraplex:time_to_first_token_seconds_bucket{job="loraplex"}) by (le)'
        deadline, result = time.monotonic() + 60, []
        while time.monotonic() < deadline and not result:
            time.sleep(1)
            try:
                reply = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": query}, timeout=5)
            except httpx.HTTPError:
                continue
            if reply.status_code == 200:
                result = reply.json()["data"]["result"]
        assert result, (tmp_path / "prometheus.log").read_text()[-2000:]
        assert any(float(r["value"][1]) >= 1 for r in result)  # at least one observed request
        up = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": "up"}).json()["data"]["result"]
        assert up and up[0]["value"][1] == "1"
    finally:
        prometheus.terminate()
        prometheus.wait(30)
