"""Runs an open-loop load test and reports it (JSON field names as in ``vllm bench serve``)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlparse

import httpx

from .churn import ChurnConfig, churn
from .client import RequestResult, send
from .stats import percentile, summarize_ms
from .workload import WorkloadConfig, build_requests


@dataclass(frozen=True)
class SLO:
    ttft_s: float | None = 0.2
    e2e_s: float | None = None

    @classmethod
    def parse(cls, text: str) -> "SLO":
        """``ttft=200ms,e2e=2s`` -> SLO(0.2, 2.0)."""
        values: dict[str, float] = {}
        for part in filter(None, text.split(",")):
            key, _, raw = part.partition("=")
            if key not in ("ttft", "e2e"):
                raise ValueError(f"unknown SLO metric {key!r} (use ttft, e2e)")
            raw = raw.strip()
            values[key] = float(raw[:-2]) / 1000 if raw.endswith("ms") else float(raw.rstrip("s"))
        return cls(values.get("ttft"), values.get("e2e"))

    def met_by(self, result: RequestResult) -> bool:
        return result.ok and (self.ttft_s is None or (result.ttft_s or 0) <= self.ttft_s) and (
            self.e2e_s is None or (result.e2e_s or 0) <= self.e2e_s)


@dataclass(frozen=True)
class RunConfig:
    url: str
    workload: WorkloadConfig
    duration_s: float
    warmup_s: float = 0.0
    slo: SLO = SLO()
    timeout_s: float = 120.0
    api_key: str | None = None
    allow_remote: bool = False
    churn: ChurnConfig | None = None
    # Closed loop: this many requests in flight at all times (arrival times are then ignored).
    concurrency: int | None = None


def check_target(url: str, allow_remote: bool) -> None:
    """Loopback only unless allowed; ``http://host:port`` (OpenAI API) or ``grpc://host:port``."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https", "grpc"):
        raise ValueError(f"{url}: use http://, https:// or grpc://")
    host = parsed.hostname or ""
    if allow_remote or host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(f"{url} is not a loopback address; pass --allow-remote to load-test another host")


async def run(config: RunConfig, progress=None) -> list[RequestResult]:
    """Send the workload's requests at their times until ``duration_s`` (plus warm-up) has passed."""
    results, _ = await run_with_churn(config, progress)
    return results


async def run_with_churn(config: RunConfig, progress=None) -> tuple[list[RequestResult], list[dict]]:
    """:func:`run`, plus the adapter churn records when ``config.churn`` is set."""
    stop = asyncio.Event()
    churn_task = asyncio.ensure_future(churn(config.url, config.churn, stop)) if config.churn else None
    try:
        results = await _send_all(config, progress)
    finally:
        stop.set()
    return results, (await churn_task if churn_task else [])


async def _send_all(config: RunConfig, progress) -> list[RequestResult]:
    """Open or closed loop over HTTP (OpenAI API) or gRPC, by the target's scheme."""
    check_target(config.url, config.allow_remote)
    specs = request_specs(config)
    headers = {"authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    loop = _closed_loop if config.concurrency else _open_loop
    if config.url.startswith("grpc://"):
        import grpc

        from .grpc_client import send_grpc

        async with grpc.aio.insecure_channel(urlparse(config.url).netloc) as channel:
            return await loop(config, specs, progress, lambda spec, sent_at: send_grpc(
                channel, spec, sent_at, config.timeout_s, tuple(headers.items())))
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=config.timeout_s, limits=limits) as client:
        return await loop(config, specs, progress,
                          lambda spec, sent_at: send(client, config.url, spec, sent_at, headers))


async def _open_loop(config: RunConfig, specs, progress, send_one) -> list[RequestResult]:
    """Each request at its arrival time, whatever is still in flight."""
    start = time.perf_counter()
    tasks = []
    for spec in specs:
        if spec.send_at > config.warmup_s + config.duration_s:
            break
        delay = start + spec.send_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(send_one(spec, spec.send_at)))
        if progress:
            progress(len(tasks), sum(t.done() for t in tasks))
    return list(await asyncio.gather(*tasks))


async def _closed_loop(config: RunConfig, specs, progress, send_one) -> list[RequestResult]:
    """``concurrency`` workers, each sending its next request as soon as the last one finished."""
    start = time.perf_counter()
    end = start + config.warmup_s + config.duration_s
    queue = iter(specs)
    results: list[RequestResult] = []

    async def worker() -> None:
        while time.perf_counter() < end:
            spec = next(queue, None)
            if spec is None:
                return
            results.append(await send_one(spec, time.perf_counter() - start))
            if progress:
                progress(len(results), len(results))

    await asyncio.gather(*[worker() for _ in range(config.concurrency)])
    return sorted(results, key=lambda r: r.index)


def report(results: list[RequestResult], config: RunConfig) -> dict:
    measured = [r for r in results if r.sent_at >= config.warmup_s]
    done = [r for r in measured if r.ok]
    duration = config.duration_s
    errors: dict[str, int] = {}
    for r in measured:
        if not r.ok:
            errors[r.error or "unknown"] = errors.get(r.error or "unknown", 0) + 1
    out_tokens = sum(r.output_tokens for r in done)
    in_tokens = sum(r.prompt_tokens for r in done)
    result = {
        "duration": duration, "request_rate": config.workload.rate, "burstiness": config.workload.burstiness,
        "max_concurrency": config.concurrency,
        "num_prompts": len(measured), "completed": len(done), "failed": len(measured) - len(done),
        "errors": errors, "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(done) / duration, "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        **summarize_ms("ttft", [r.ttft_s for r in done if r.ttft_s is not None]),
        **summarize_ms("tpot", [r.tpot_s for r in done if r.tpot_s is not None]),
        **summarize_ms("itl", [x for r in done for x in r.itl_s]),
        **summarize_ms("e2el", [r.e2e_s for r in done if r.e2e_s is not None]),
    }
    good = [r for r in measured if config.slo.met_by(r)]
    result["request_goodput"] = len(good) / duration
    result["slo"] = {"ttft_ms": None if config.slo.ttft_s is None else 1000 * config.slo.ttft_s,
                     "e2e_ms": None if config.slo.e2e_s is None else 1000 * config.slo.e2e_s}
    result["slo_met"] = bool(done) and not errors and (
        config.slo.ttft_s is None or result["p99_ttft_ms"] <= 1000 * config.slo.ttft_s) and (
        config.slo.e2e_s is None or result["p99_e2el_ms"] <= 1000 * config.slo.e2e_s)
    per_model: dict[str, dict] = {}
    for model in sorted({r.model for r in measured}):
        rs = [r for r in done if r.model == model]
        per_model[model] = {"completed": len(rs), "failed": sum(1 for r in measured if r.model == model and not r.ok),
                            "p50_ttft_ms": 1000 * percentile([r.ttft_s for r in rs if r.ttft_s is not None], 50),
                            "p99_ttft_ms": 1000 * percentile([r.ttft_s for r in rs if r.ttft_s is not None], 99),
                            "p99_e2el_ms": 1000 * percentile([r.e2e_s for r in rs if r.e2e_s is not None], 99)}
    result["per_model"] = per_model
    return result


def churn_report(records: list[dict]) -> dict:
    loads = [r for r in records if "error" not in r]
    return {"loads": len(records), "failed_loads": len(records) - len(loads),
            **summarize_ms("load", [r["load_s"] for r in loads]),
            **summarize_ms("load_to_first_token", [r["load_to_first_token_s"] for r in loads]),
            "errors": [r["error"] for r in records if "error" in r][:10]}


def print_table(result: dict, stream=sys.stdout) -> None:
    rows = [("requests completed / failed", f"{result['completed']} / {result['failed']}"),
            ("request throughput (req/s)", f"{result['request_throughput']:.2f}"),
            ("output throughput (tok/s)", f"{result['output_throughput']:.1f}"),
            ("goodput (req/s within SLO)", f"{result['request_goodput']:.2f}")]
    for metric in ("ttft", "tpot", "itl", "e2el"):
        rows.append((f"{metric.upper()} mean / p50 / p99 (ms)",
                     " / ".join(f"{result[f'{k}_{metric}_ms']:.1f}" for k in ("mean", "median", "p99"))))
    if "churn" in result:
        c = result["churn"]
        rows.append(("adapter loads ok / failed", f"{c['loads'] - c['failed_loads']} / {c['failed_loads']}"))
        rows.append(("load call -> first token p50 / p99 (ms)",
                     f"{c['median_load_to_first_token_ms']:.1f} / {c['p99_load_to_first_token_ms']:.1f}"))
    rows.append(("SLO " + ", ".join(f"{k}<={v:g}" for k, v in result["slo"].items() if v is not None),
                 "MET" if result["slo_met"] else "MISSED"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}", file=stream)


def run_and_report(config: RunConfig, out_dir: Path | None, plot: bool = True) -> dict:
    num_expected = len([s for s in request_specs(config)
                        if config.concurrency or s.send_at <= config.warmup_s + config.duration_s])

    def progress(sent: int, done: int) -> None:
        bar = "#" * int(30 * sent / max(1, num_expected))
        print(f"\r[{bar:<30}] sent {sent}/{num_expected}", end="", file=sys.stderr, flush=True)

    results, churn_records = asyncio.run(run_with_churn(config, progress))
    print(file=sys.stderr)
    result = report(results, config)
    if config.churn is not None:
        result["churn"] = churn_report(churn_records)
    print_table(result)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "result.json").write_text(json.dumps(result, indent=2))
        if plot:  # one rate: each request over time and the CDFs (a rate sweep plots latency vs rate)
            from .plot import plot_single_run

            plot_single_run([(r.sent_at, r.ttft_s, r.e2e_s) for r in results if r.ok], out_dir / "latency.png",
                            result["slo"]["ttft_ms"], result["slo"]["e2e_ms"],
                            title=f"loraplex loadtest at {config.workload.rate:g} req/s")
    return result


COMPARED = ("request_throughput", "output_throughput", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms",
            "p99_itl_ms", "p99_e2el_ms", "request_goodput", "failed")


def compare(first: dict, second: dict, stream=sys.stdout) -> dict[str, float | None]:
    """Ratio table second / first over the same workload."""
    ratios = {}
    print(f"{'metric':<22} {'first':>10} {'second':>10} {'second/first':>12}", file=stream)
    for key in COMPARED:
        a, b = first[key], second[key]
        ratios[key] = b / a if a else None
        ratio = f"{ratios[key]:.2f}" if ratios[key] is not None else "-"
        print(f"{key:<22} {a:>10.2f} {b:>10.2f} {ratio:>12}", file=stream)
    return ratios


def num_requests_for(rate: float, duration_s: float, warmup_s: float) -> int:
    return max(1, math.ceil(rate * (duration_s + warmup_s)) + 1)


def closed_loop_requests(concurrency: int, duration_s: float, warmup_s: float,
                         max_rate_per_worker: float = 100.0) -> int:
    """Enough requests that closed-loop workers never run out before the time is up (the
    arrival rate plays no part there)."""
    return num_requests_for(concurrency * max_rate_per_worker, duration_s, warmup_s)


def request_specs(config: RunConfig) -> list:
    """The run's request sequence; a closed loop gets as many as its workers could ever send,
    whatever ``num_requests`` the workload was sized with for its arrival rate."""
    workload = config.workload
    if config.concurrency:
        workload = replace(workload, num_requests=closed_loop_requests(config.concurrency, config.duration_s,
                                                                       config.warmup_s))
    return build_requests(workload)
