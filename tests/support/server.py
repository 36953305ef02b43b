"""Runs the real ``loraplex serve`` as a child process for integration tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    process: subprocess.Popen
    port: int
    grpc_port: int
    log_path: Path

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, num_lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-num_lines:])

    def descendants(self) -> list[int]:
        """Pids of the server's child processes (vLLM's engine core and workers), recursively."""
        found, todo = [], [self.process.pid]
        while todo:
            pid = todo.pop()
            for children in Path(f"/proc/{pid}/task").glob("*/children"):
                try:
                    kids = [int(c) for c in children.read_text().split()]
                except OSError:
                    continue
                found.extend(kids)
                todo.extend(kids)
        return found

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_server(args: list[str], log_path: Path, startup_timeout: float = 600) -> RunningServer:
    port, grpc_port = free_port(), free_port()
    log = log_path.open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "loraplex.server.cli", "serve", "--port", str(port), "--grpc-port", str(grpc_port), *args],
        stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[2],
        env={**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "PYTHONUNBUFFERED": "1"})
    server = RunningServer(process, port, grpc_port, log_path)
    deadline = time.monotonic() + startup_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(1)
    server.stop()
    raise RuntimeError(f"server did not become healthy in {startup_timeout}s:\n{server.log_tail()}")


def alive(pids: list[int]) -> list[int]:
    """The pids still running (zombies, which are only waiting to be reaped, do not count)."""
    running = []
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text(errors="replace")
        except OSError:
            continue
        if "zombie" not in status.lower():
            running.append(pid)
    return running


def scrape(server: RunningServer) -> list:
    """Every sample of a real ``/metrics`` scrape, parsed by prometheus_client."""
    from prometheus_client.parser import text_string_to_metric_families

    response = httpx.get(f"{server.url}/metrics")
    assert response.status_code == 200
    return [s for family in text_string_to_metric_families(response.text) for s in family.samples]


def wait_for(predicate, timeout: float = 30.0, every_s: float = 0.2) -> bool:
    """Poll ``predicate`` until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every_s)
    return False
