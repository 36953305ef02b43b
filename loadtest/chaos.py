"""Tenant-isolation chaos while steady traffic runs: a careless operator's and a hostile
tenant's actions against the admin API and the adapter files, each with what must happen.

Every ``interval`` seconds one action, in turn:

- ``nan_adapter``: load an adapter holding a NaN weight -> refused (400);
- ``engine_refused``: load an adapter only vLLM's own loader refuses (PiSSA init) -> 400;
- ``files_changed``: load a copy, then rewrite, truncate and delete the copy's files -> its
  requests still succeed with the same greedy output;
- ``replace_under_load``: a burst of requests to one adapter, replaced and then unloaded while
  they queue and run -> every request of the burst succeeds;
- ``health``: /health is polled all along; any non-200 counts as an engine death.

The good traffic (the runner's workload) must see zero failures.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ACTIONS = ("nan_adapter", "engine_refused", "files_changed", "replace_under_load")


@dataclass(frozen=True)
class ChaosConfig:
    good_adapter: Path  # a valid adapter directory the bad ones are made from
    admin_token: str
    interval_s: float = 3.0
    burst: int = 6  # requests per replace_under_load


def make_variant(good: Path, dst: Path, *, config_changes: dict | None = None, nan: bool = False) -> Path:
    """A copy of ``good`` with config changes and/or one NaN in a B matrix."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True)
    config = json.loads((good / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**config, **(config_changes or {})}))
    weights = load_file(str(good / "adapter_model.safetensors"))
    if nan:
        weights[next(k for k in sorted(weights) if ".lora_B." in k)][0, 0] = float("nan")
    save_file(weights, str(dst / "adapter_model.safetensors"))
    return dst


class Chaos:
    def __init__(self, url: str, config: ChaosConfig, workdir: Path) -> None:
        self.url = url
        self.config = config
        self.workdir = workdir
        self.records: list[dict] = []
        self.health_failures = 0
        self.health_checks = 0
        self._counter = 0

    async def run(self, stop: asyncio.Event) -> dict:
        headers = {"authorization": f"Bearer {self.config.admin_token}"}
        async with httpx.AsyncClient(timeout=120, headers=headers) as client:
            health = asyncio.ensure_future(self._watch_health(client, stop))
            i = 0
            while not stop.is_set():
                started = time.perf_counter()
                action = ACTIONS[i % len(ACTIONS)]
                record = {"action": action}
                try:
                    record.update(await getattr(self, action)(client))
                except (httpx.HTTPError, AssertionError, RuntimeError) as exc:
                    record.update(ok=False, error=f"{type(exc).__name__}: {exc}")
                self.records.append(record)
                i += 1
                try:
                    await asyncio.wait_for(stop.wait(), max(0.0, self.config.interval_s - (time.perf_counter() - started)))
                except asyncio.TimeoutError:
                    pass
            await health
        return self.summary()

    def summary(self) -> dict:
        by_action: dict[str, dict] = {}
        for record in self.records:
            entry = by_action.setdefault(record["action"], {"runs": 0, "as_expected": 0})
            entry["runs"] += 1
            entry["as_expected"] += bool(record.get("ok"))
        return {"actions": by_action, "unexpected": [r for r in self.records if not r.get("ok")],
                "health_checks": self.health_checks, "health_failures": self.health_failures}

    def _name(self, kind: str) -> str:
        self._counter += 1
        return f"chaos-{kind}-{self._counter}"

    async def _load(self, client, name: str, path: Path) -> httpx.Response:
        return await client.post(f"{self.url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})

    async def _unload(self, client, name: str) -> None:
        await client.post(f"{self.url}/v1/unload_lora_adapter", json={"lora_name": name})

    async def _greedy(self, client, model: str) -> str:
        response = await client.post(f"{self.url}/v1/completions", json={
            "model": model, "prompt": "Name three rivers:", "max_tokens": 6, "temperature": 0})
        if response.status_code != 200:
            raise RuntimeError(f"{model}: HTTP {response.status_code} {response.text[:200]}")
        return response.json()["choices"][0]["text"]

    async def _watch_health(self, client, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.health_checks += 1
            try:
                ok = (await client.get(f"{self.url}/health", timeout=10)).status_code == 200
            except httpx.HTTPError:
                ok = False
            self.health_failures += not ok
            try:
                await asyncio.wait_for(stop.wait(), 0.5)
            except asyncio.TimeoutError:
                pass

    async def _refused(self, client, kind: str, **variant) -> dict:
        path = await asyncio.to_thread(make_variant, self.config.good_adapter, self.workdir / self._name(kind),
                                       **variant)
        response = await self._load(client, path.name, path)
        return {"ok": response.status_code == 400, "status": response.status_code}

    async def nan_adapter(self, client) -> dict:
        return await self._refused(client, "nan", nan=True)

    async def engine_refused(self, client) -> dict:
        return await self._refused(client, "pissa", config_changes={"init_lora_weights": "pissa"})

    async def files_changed(self, client) -> dict:
        name = self._name("fragile")
        path = await asyncio.to_thread(shutil.copytree, self.config.good_adapter, self.workdir / name)
        response = await self._load(client, name, path)
        if response.status_code != 200:
            return {"ok": False, "status": response.status_code}
        try:
            before = await self._greedy(client, name)
            weights = path / "adapter_model.safetensors"
            weights.write_bytes(b"\0" * 64)  # rewritten
            weights.write_bytes(b"")  # truncated
            shutil.rmtree(path)  # deleted
            after = await self._greedy(client, name)
            return {"ok": before == after, "same_output": before == after}
        finally:
            await self._unload(client, name)

    async def replace_under_load(self, client) -> dict:
        name = self._name("replaced")
        response = await self._load(client, name, self.config.good_adapter)
        if response.status_code != 200:
            return {"ok": False, "status": response.status_code}
        burst = [asyncio.ensure_future(self._greedy(client, name)) for _ in range(self.config.burst)]
        await asyncio.sleep(0.05)
        replaced = await self._load(client, name, self.config.good_adapter)  # a new version
        await self._unload(client, name)  # and gone, while the burst still queues or runs
        results = await asyncio.gather(*burst, return_exceptions=True)
        failures = [str(r) for r in results if isinstance(r, BaseException)]
        return {"ok": replaced.status_code == 200 and not failures, "burst_failures": failures}


async def run_chaos(url: str, config: ChaosConfig, stop: asyncio.Event) -> dict:
    with tempfile.TemporaryDirectory(prefix="loraplex-chaos-") as workdir:
        return await Chaos(url, config, Path(workdir)).run(stop)
