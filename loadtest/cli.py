"""``loraplex loadtest``: its flags and what it runs (the server's command line only dispatches here)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

HELP = """Send load to a running server (OpenAI API or gRPC) and report TTFT, TPOT, ITL and end-to-end
latency percentiles, throughput and goodput under an SLO, like `vllm bench serve`.
Example: loraplex loadtest --url http://127.0.0.1:8000 --rate 2 --duration 60 --slo ttft=200ms"""


def _length_range(text: str) -> tuple[int, int]:
    """``128`` -> (128, 128); ``64:256`` -> (64, 256)."""
    low, _, high = text.partition(":")
    return int(low), int(high or low)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000",
                   help="an OpenAI-compatible server, or grpc://HOST:PORT for loraplex's gRPC API")
    p.add_argument("--rate", type=float, required=True, help="arrival rate, requests/s (open loop)")
    p.add_argument("--duration", type=float, default=30.0, help="measured seconds (after warm-up)")
    p.add_argument("--warmup", type=float, default=0.0, help="seconds of load excluded from results")
    p.add_argument("--burstiness", type=float, default=1.0, help="1 = Poisson; gamma shape otherwise")
    p.add_argument("--models", default=None, help="comma-separated models/adapters (default: all the server lists)")
    p.add_argument("--adapter-mix", default="uniform", help="uniform | zipf:ALPHA | weights:FILE.json")
    p.add_argument("--api", choices=("completions", "chat"), default="completions",
                   help="chat: each prompt is sent as one user message to /v1/chat/completions")
    p.add_argument("--concurrency", type=int, default=None,
                   help="closed loop: keep this many requests in flight (instead of --rate arrivals)")
    p.add_argument("--find-capacity", action="store_true",
                   help="bisect for the highest rate in [--rate-min, --rate] whose p99 meets the SLO")
    p.add_argument("--rate-min", type=float, default=0.25)
    p.add_argument("--search-steps", type=int, default=3)
    p.add_argument("--compare", default=None, metavar="URL",
                   help="run the identical workload against this second endpoint and print the ratios")
    p.add_argument("--prompt-len", type=_length_range, default=(128, 128), help="words: N or MIN:MAX")
    p.add_argument("--output-len", type=_length_range, default=(16, 16), help="tokens: N or MIN:MAX")
    p.add_argument("--prompts-file", type=Path, default=None, help='JSONL of {"prompt": ...}')
    p.add_argument("--slo", default="ttft=200ms", help="e.g. ttft=200ms,e2e=2s (judged on p99)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default=None)
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback target")
    p.add_argument("--out", type=Path, default=None, help="directory for result.json")
    p.add_argument("--churn-adapters", type=Path, nargs="*", default=(),
                   help="adapter directories to load/unload through the admin API while traffic runs")
    p.add_argument("--churn-interval", type=float, default=1.0, help="seconds between churn loads")
    p.add_argument("--admin-token", default=None, help="the server's admin token (needed for churn)")


def run(args: argparse.Namespace) -> int:
    import httpx

    from .churn import ChurnConfig
    from .runner import (
        SLO,
        RunConfig,
        check_target,
        compare,
        num_requests_for,
        run_and_report,
    )
    from .workload import WorkloadConfig

    check_target(args.url, args.allow_remote)
    if args.models:
        models = tuple(m for m in args.models.split(",") if m)
    elif args.url.startswith("grpc://"):
        print("loraplex loadtest: a grpc:// target needs --models", file=sys.stderr)
        return 2
    elif args.adapter_mix.startswith("weights:"):
        from .workload import read_weights_file

        models = tuple(read_weights_file(Path(args.adapter_mix.split(":", 1)[1])))
    else:
        headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        models = tuple(m["id"] for m in httpx.get(f"{args.url}/v1/models", headers=headers).json()["data"])
    workload = WorkloadConfig(
        models=models, rate=args.rate, num_requests=num_requests_for(args.rate, args.duration, args.warmup),
        seed=args.seed, burstiness=args.burstiness, adapter_mix=args.adapter_mix, prompt_len=args.prompt_len,
        output_len=args.output_len, prompts_file=args.prompts_file, api=args.api)
    churn = None
    if args.churn_adapters:
        if not args.admin_token:
            print("loraplex loadtest: --churn-adapters needs --admin-token", file=sys.stderr)
            return 2
        churn = ChurnConfig(tuple(p.resolve() for p in args.churn_adapters), args.admin_token, args.churn_interval)
    config = RunConfig(url=args.url.rstrip("/"), workload=workload, duration_s=args.duration, warmup_s=args.warmup,
                       slo=SLO.parse(args.slo), api_key=args.api_key, allow_remote=args.allow_remote, churn=churn,
                       concurrency=args.concurrency)
    if args.find_capacity:
        return _find_capacity(args, config)
    result = run_and_report(config, args.out)
    if args.compare:
        check_target(args.compare, args.allow_remote)
        print(f"\n== same workload against {args.compare}")
        second = run_and_report(replace(config, url=args.compare.rstrip("/")),
                                args.out / "compare" if args.out else None)
        ratios = compare(result, second)
        if args.out:
            (args.out / "compare.json").write_text(json.dumps({"first": args.url, "second": args.compare,
                                                                "ratios": ratios}, indent=2))
    return 0 if result["completed"] else 1


def _find_capacity(args: argparse.Namespace, config) -> int:
    from .capacity import find_capacity
    from .plot import plot_latency_vs_rate
    from .runner import num_requests_for, run_and_report

    results = []

    def run_at(rate: float) -> bool:
        print(f"\n== rate {rate:g} req/s")
        workload = replace(config.workload, rate=rate, num_requests=num_requests_for(rate, args.duration, args.warmup))
        out = args.out / f"rate-{rate:g}" if args.out else None
        result = run_and_report(replace(config, workload=workload), out, plot=False)
        results.append(result)
        return result["slo_met"]

    found = find_capacity(run_at, args.rate_min, args.rate, args.search_steps)
    summary = {"capacity_rate": found.capacity_rate, "steps": found.steps, "slo": results[0]["slo"]}
    print(f"\ncapacity: {found.capacity_rate if found.capacity_rate is not None else 'below ' + str(args.rate_min)}"
          " req/s meets the SLO at p99")
    if args.out:
        (args.out / "capacity.json").write_text(json.dumps(summary, indent=2))
        plot_latency_vs_rate(results, args.out / "latency_vs_rate.png", results[0]["slo"]["ttft_ms"])
    return 0
