"""One real server (vLLM engine on the embedded model) per test session."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.support.adapters import load_base_model, make_adapter
from tests.support.server import RunningServer, alive, scrape, start_server

NUM_ADAPTERS = 9
ADAPTER_RANK = 8
ADMIN_TOKEN = "test-admin-token"
METRICS_MAX_ADAPTERS = 4
GRAMMAR_COMPILE_BUDGET_S = 3  # (every test's schemas compile in milliseconds)


@pytest.fixture(scope="session")
def hf_base_model(base_model_dir: Path):
    """The base model in transformers (fp32), for making adapters and for HF+peft references."""
    model = load_base_model(base_model_dir, dtype="float32")
    model.eval()
    return model


@pytest.fixture(scope="session")
def hf_tokenizer(base_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_model_dir)


@pytest.fixture(scope="session")
def adapter_dir(tmp_path_factory, hf_base_model) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    for i in range(NUM_ADAPTERS):
        make_adapter(hf_base_model, root / f"adapter-{i}", seed=1000 + i, rank=ADAPTER_RANK)
    return root


@pytest.fixture(scope="session")
def adapter_names(adapter_dir: Path) -> list[str]:
    return sorted(p.name for p in adapter_dir.iterdir())


@pytest.fixture(scope="session")
def capture_dir(tmp_path_factory) -> Path:
    """Where the session server captures served traffic (--capture-dir)."""
    return tmp_path_factory.mktemp("capture")


@pytest.fixture(scope="session")
def server(tmp_path_factory, adapter_dir: Path, cache_dir: Path, base_model_dir: Path,
           capture_dir: Path) -> RunningServer:
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    # float32 so that greedy tokens can be compared with HF transformers + peft exactly.
    running = start_server(
        ["--adapter-dir", str(adapter_dir), "--cache-dir", str(cache_dir), "--dtype", "float32",
         "--kv-cache-gib", "1", "--max-loras", "4", "--max-cpu-loras", "16", "--max-model-len", "1024",
         "--admin-token", ADMIN_TOKEN, "--watch-interval", "0.5", "--pin", "adapter-0",
         "--metrics-max-adapters", str(METRICS_MAX_ADAPTERS), "--capture-dir", str(capture_dir),
         "--max-grammar-compile-s", str(GRAMMAR_COMPILE_BUDGET_S)],
        log_path)
    yield running
    children = running.descendants()
    assert children, "the engine's processes were not found"
    assert running.stop() == 0, f"SIGTERM must end the server cleanly:\n{running.log_tail()}"
    time.sleep(2)
    assert not alive(children), "engine processes outlived the server"


@pytest.fixture(scope="session")
def base_model_name() -> str:
    from loraplex.server.default_model import DEFAULT_MODEL_NAME

    return DEFAULT_MODEL_NAME


@pytest.fixture(scope="session")
def client(server: RunningServer):
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def engine_unfinished_requests(server: RunningServer) -> float:
    """The engine's own count of requests it still holds, from a real /metrics scrape."""
    samples = [s for s in scrape(server) if s.name == "loraplex:engine_unfinished_requests"]
    assert samples, "loraplex:engine_unfinished_requests missing from /metrics"
    return sum(s.value for s in samples)


def wait_until_engine_idle(server: RunningServer, timeout: float = 30) -> float:
    import time

    deadline = time.monotonic() + timeout
    while (count := engine_unfinished_requests(server)) > 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    return count
