"""Admin actions racing each other and the requests that use their adapters, over gRPC, with a
careless operator's deadlines (5 ms to 10 s: many loads and unloads are cancelled midway).

Workers pick at random: load a name from one of ``sources`` (the same name from different
directories: a replace), unload it, or generate on it. What must hold afterwards: no call ended
INTERNAL or UNKNOWN, no version is left loading, the engine holds exactly the ready adapters (a
cancelled load or unload leaks no engine entry), and /health is 200. The race names are unloaded
at the end.

    python -m loraplex.loadtest.scenarios admin_race --race-adapters DIR DIR ... --admin-token T
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx

SERVER_FAULTS = frozenset({"INTERNAL", "UNKNOWN", "DATA_LOSS"})


@dataclass(frozen=True)
class AdminRaceConfig:
    url: str  # the HTTP door: listing, metrics, health
    grpc_target: str  # host:port of the gRPC door, where the race runs
    admin_token: str
    sources: tuple[Path, ...]  # adapter directories the race loads its names from
    duration_s: float = 60.0
    names: tuple[str, ...] = ("race-a", "race-b")
    workers: int = 4
    deadlines_s: tuple[float, ...] = (0.005, 0.02, 0.05, 0.2, 1.0, 10.0)
    seed: int = 0


def race_verdict(codes: Counter, listing: list[dict], metric_values: dict[str, float], health_status: int) -> dict:
    """What the race left behind. ``codes``: (action, status name) -> calls; ``listing``: the admin
    view of /v1/adapters; ``metric_values``: ``loraplex:adapters{state="ready"}`` and
    ``loraplex:adapters_resident{tier="cpu"}`` by those names."""
    ready = metric_values.get('loraplex:adapters{state="ready"}', 0.0)
    resident = metric_values.get('loraplex:adapters_resident{tier="cpu"}', 0.0)
    return {"calls": {f"{action} {code}": n for (action, code), n in sorted(codes.items())},
            "server_faults": sum(n for (_, code), n in codes.items() if code in SERVER_FAULTS),
            "left_loading": sorted(a["name"] for a in listing if a["status"] == "loading"),
            "ready_adapters": ready, "engine_resident": resident,
            "leaked_engine_entries": max(0.0, resident - ready), "health_status": health_status}


async def _worker(config: AdminRaceConfig, seed: int, stop_at: float, codes: Counter) -> None:
    import grpc

    from loraplex.server.grpc_gen import loraplex_pb2 as pb
    from loraplex.server.grpc_gen import loraplex_pb2_grpc as pb_grpc

    rng = random.Random(seed)
    admin = (("authorization", f"Bearer {config.admin_token}"),)
    async with grpc.aio.insecure_channel(config.grpc_target) as channel:
        adapters, generation = pb_grpc.AdaptersStub(channel), pb_grpc.GenerationStub(channel)
        while time.monotonic() < stop_at:
            name, action = rng.choice(config.names), rng.choice(("load", "load", "unload", "generate", "generate"))
            deadline = rng.choice(config.deadlines_s)
            try:
                if action == "load":
                    await adapters.LoadAdapter(pb.LoadAdapterRequest(name=name, path=str(rng.choice(config.sources))),
                                               metadata=admin, timeout=deadline)
                elif action == "unload":
                    await adapters.UnloadAdapter(pb.UnloadAdapterRequest(name=name), metadata=admin, timeout=deadline)
                else:
                    await generation.Generate(pb.GenerateRequest(
                        model=name, text="Hello there", sampling=pb.SamplingParameters(max_tokens=3, temperature=0.0)),
                        timeout=30)
                codes[(action, "OK")] += 1
            except grpc.aio.AioRpcError as exc:
                codes[(action, exc.code().name)] += 1


async def run_admin_race(config: AdminRaceConfig, settle_s: float = 3.0) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    codes: Counter = Counter()
    stop_at = time.monotonic() + config.duration_s
    await asyncio.gather(*(_worker(config, config.seed + i, stop_at, codes) for i in range(config.workers)))
    await asyncio.sleep(settle_s)  # cancelled work finishing in the background; the residency refresh
    headers = {"authorization": f"Bearer {config.admin_token}"}
    async with httpx.AsyncClient(base_url=config.url, timeout=30) as client:
        listing = (await client.get("/v1/adapters", headers=headers)).json()["data"]
        metric_values = {}
        for family in text_string_to_metric_families((await client.get("/metrics")).text):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                metric_values[f"{sample.name}{{{labels}}}"] = sample.value
        health_status = (await client.get("/health")).status_code
        verdict = race_verdict(codes, listing, metric_values, health_status)
        for name in config.names:  # leave the server as it was found
            await client.post("/v1/unload_lora_adapter", json={"lora_name": name}, headers=headers)
    return verdict
