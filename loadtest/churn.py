"""Adapter churn while traffic runs: load an adapter through the admin API every ``interval``
seconds (cycling over source directories under fresh names), time load call -> first token from
the new adapter, and unload the previous one."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


@dataclass(frozen=True)
class ChurnConfig:
    adapter_paths: tuple[Path, ...]
    admin_token: str
    interval_s: float = 1.0
    name_prefix: str = "churn"


async def _first_token_s(client: httpx.AsyncClient, url: str, model: str, start: float) -> float:
    body = {"model": model, "prompt": "Hello", "max_tokens": 1, "temperature": 0.0, "stream": True}
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]" and json.loads(line[6:]).get("choices"):
                return time.perf_counter() - start
    raise RuntimeError(f"{model} produced no token")


async def churn(url: str, config: ChurnConfig, stop: asyncio.Event) -> list[dict]:
    """Runs until ``stop`` is set; returns one record per load (latencies or the error)."""
    records: list[dict] = []
    headers = {"authorization": f"Bearer {config.admin_token}"}
    previous: str | None = None
    async with httpx.AsyncClient(timeout=120, headers=headers) as client:
        i = 0
        while not stop.is_set():
            name = f"{config.name_prefix}-{i}"
            path = config.adapter_paths[i % len(config.adapter_paths)]
            start = time.perf_counter()
            record: dict = {"name": name}
            try:
                response = await client.post(f"{url}/v1/load_lora_adapter",
                                             json={"lora_name": name, "lora_path": str(path)})
                response.raise_for_status()
                record["load_s"] = time.perf_counter() - start
                record["load_to_first_token_s"] = await _first_token_s(client, url, name, start)
                if previous is not None:
                    unloaded = await client.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": previous})
                    unloaded.raise_for_status()
                previous = name
            except (httpx.HTTPError, RuntimeError) as exc:
                record["error"] = str(exc)
            records.append(record)
            i += 1
            try:
                await asyncio.wait_for(stop.wait(), timeout=max(0.0, config.interval_s - (time.perf_counter() - start)))
            except asyncio.TimeoutError:
                pass
        if previous is not None:
            await client.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": previous})
    return records
