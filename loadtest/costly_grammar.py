"""A hostile tenant's structured-output constraints that are slow to compile or to enforce, beside
other tenants' new small schemas and plain requests: what the others wait for.

Every ``hostile_interval_s`` the first model sends a new constraint (never sent before, so never
cached): with ``hostile_kind`` "compile", a schema of ``hostile_fields`` bounded strings (valid,
~45 bytes a field, each about a CPU-second of xgrammar's compile); with "mask", a regex of
``hostile_repeats`` nested repetitions (compiles in a second, each token's mask costs xgrammar
~0.5 CPU-second at 120, and the engine's batch waits for it at every step). Every
``light_interval_s`` each other model sends one request with a new one-field schema and one plain
request. Reported per kind: statuses and latency; what must hold: no 5xx, /health 200 all along,
the light schemas served.

    python -m loraplex.loadtest.scenarios costly_grammar --url ... --models HOSTILE M1 M2 --duration 120
    python -m loraplex.loadtest.scenarios costly_grammar --hostile-kind mask --url ... --models HOSTILE M1 M2
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from dataclasses import dataclass

import httpx

from .stats import percentile

KINDS = ("hostile", "light_schema", "plain")
HOSTILE_KINDS = ("compile", "mask")


@dataclass(frozen=True)
class CostlyGrammarConfig:
    url: str
    hostile_model: str
    other_models: tuple[str, ...]
    duration_s: float = 120.0
    hostile_kind: str = "compile"  # one of HOSTILE_KINDS
    hostile_fields: int = 200
    hostile_repeats: int = 120
    hostile_interval_s: float = 20.0
    light_interval_s: float = 3.0
    max_tokens: int = 16
    timeout_s: float = 900.0


def costly_schema(num_fields: int, tag: str) -> dict:
    """A valid schema of ``num_fields`` strings, each with its own maxLength (bounded lengths are
    what xgrammar 0.2.8 compiles slowest)."""
    return {"type": "object", "properties": {f"{tag}_{i}": {"type": "string", "maxLength": 50 + i}
                                             for i in range(num_fields)}}


def costly_mask_regex(num_repeats: int, tag: str) -> str:
    """A valid regex that xgrammar 0.2.8 compiles at once but fills each token's mask for slowly:
    ``num_repeats`` repetitions of a star over one broad class (every split of the text between
    them stays alive)."""
    return f"{tag}([^x]*){{{num_repeats}}}"


def light_schema(tag: str) -> dict:
    return {"type": "object", "properties": {tag: {"type": "string"}}, "required": [tag]}


def grammar_verdict(records: list[dict], health_failures: int) -> dict:
    """``records``: {"kind", "status", "latency_s"} per request (status 0: no answer)."""
    out: dict = {"health_failures": health_failures,
                 "server_errors": sum(1 for r in records if r["status"] >= 500 or r["status"] == 0)}
    for kind in KINDS:
        rs = [r for r in records if r["kind"] == kind]
        latencies = [r["latency_s"] for r in rs]
        out[kind] = {"sent": len(rs), "statuses": dict(Counter(str(r["status"]) for r in rs)),
                     "p50_s": percentile(latencies, 50) if latencies else None,
                     "p99_s": percentile(latencies, 99) if latencies else None,
                     "max_s": max(latencies, default=None)}
    return out


async def _request(client: httpx.AsyncClient, records: list[dict], kind: str, model: str, schema: dict | None,
                   max_tokens: int, regex: str | None = None) -> None:
    body: dict = {"model": model, "messages": [{"role": "user", "content": "Describe a cat in JSON."}],
                  "max_tokens": max_tokens, "temperature": 0}
    if schema is not None:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": kind, "schema": schema}}
    if regex is not None:
        body["structured_outputs"] = {"regex": regex}
    started = time.monotonic()
    try:
        status = (await client.post("/v1/chat/completions", json=body)).status_code
    except httpx.HTTPError:
        status = 0
    records.append({"kind": kind, "status": status, "latency_s": time.monotonic() - started})


async def run_costly_grammar(config: CostlyGrammarConfig) -> dict:
    records: list[dict] = []
    health_failures = 0
    stop_at = time.monotonic() + config.duration_s
    async with httpx.AsyncClient(base_url=config.url, timeout=config.timeout_s) as client:
        async def hostile() -> None:
            tasks = []
            while time.monotonic() < stop_at:
                tag = f"f{uuid.uuid4().hex[:6]}"
                if config.hostile_kind == "mask":
                    request = _request(client, records, "hostile", config.hostile_model, None, config.max_tokens,
                                       regex=costly_mask_regex(config.hostile_repeats, tag))
                else:
                    request = _request(client, records, "hostile", config.hostile_model,
                                       costly_schema(config.hostile_fields, tag), config.max_tokens)
                tasks.append(asyncio.ensure_future(request))
                await asyncio.sleep(config.hostile_interval_s)
            await asyncio.gather(*tasks)

        async def others() -> None:
            tasks = []
            await asyncio.sleep(1.0)  # after the first hostile schema
            while time.monotonic() < stop_at:
                for model in config.other_models:
                    tasks.append(asyncio.ensure_future(_request(
                        client, records, "light_schema", model, light_schema(f"n{uuid.uuid4().hex[:8]}"),
                        config.max_tokens)))
                    tasks.append(asyncio.ensure_future(_request(client, records, "plain", model, None,
                                                                config.max_tokens)))
                await asyncio.sleep(config.light_interval_s)
            await asyncio.gather(*tasks)

        async def health() -> None:
            nonlocal health_failures
            while time.monotonic() < stop_at:
                try:
                    ok = (await client.get("/health", timeout=10)).status_code == 200
                except httpx.HTTPError:
                    ok = False
                health_failures += not ok
                await asyncio.sleep(1.0)

        await asyncio.gather(hostile(), others(), health())
    return grammar_verdict(records, health_failures)
