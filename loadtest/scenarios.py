"""Robustness benchmarks against a running server (started with the admission flags you want):

    python -m loraplex.loadtest.scenarios overload --url http://127.0.0.1:8000 --capacity 1.0 --models M
    python -m loraplex.loadtest.scenarios fairness --url ... --capacity 1.0 --hot A0 --cold A1 ... A9
    python -m loraplex.loadtest.scenarios soak --url ... --capacity 1.0 --models M ... --minutes 5 \
        --server-pid PID --churn-adapters DIR ... --admin-token T

- overload: the same workload unloaded (0.25x capacity) and at 3x capacity: how much is shed
  (429), how fast, and the p99 of the admitted requests against the unloaded p99.
- fairness: nine "cold" adapters alone, then with one "hot" adapter sending 10x the traffic of
  each: the cold adapters' p99 with the hot one against their p99 alone.
- soak: 70% of capacity with adapter churn for N minutes: errors and the server's RSS growth
  (the server process and its children, e.g. vLLM's engine core).
- chaos: 50% of capacity over good adapters while bad adapters are loaded, adapter files are
  rewritten and deleted, and adapters are replaced and unloaded under queued requests
  (``loadtest/chaos.py``): failed good requests and engine deaths must both be zero.

    python -m loraplex.loadtest.scenarios chaos --url ... --capacity 1.0 --models M ... \
        --good-adapter DIR --admin-token T
- slow_clients: 50% of capacity beside well-behaved twins of the hostile clients (the same
  requests, read to the end), and beside stalled readers, clients that leave while queued and
  connections with half-sent headers (``loadtest/slow_clients.py``), in ABBA order: the steady
  traffic's p99 with the hostile clients against its p99 with their twins (target: within 1.2x).

- lora_overhead: the same open-loop rate (``--rate``, e.g. 1 req/s) on the base model alone
  (``--base``) and spread over adapters (``--models``), alternated ABBA: TTFT and TPOT p50 of
  the adapters against the base model's.

    python -m loraplex.loadtest.scenarios lora_overhead --url ... --rate 1 --base M --models A0 ... A15
- admin_race: gRPC loads, unloads and requests on the same names racing, with deadlines from 5 ms
  to 10 s (``loadtest/admin_race.py``): no INTERNAL, no version left loading, no engine entry leaked.

    python -m loraplex.loadtest.scenarios admin_race --race-adapters DIR DIR ... --admin-token T --duration 90
- costly_grammar: one tenant sends a new schema of bounded strings (slow to compile; with
  ``--hostile-kind mask``, a regex of nested repetitions, slow to enforce) every 20 s, the others
  new small schemas and plain requests (``loadtest/costly_grammar.py``): what the others wait
  for; no 5xx, /health 200.

    python -m loraplex.loadtest.scenarios costly_grammar --url ... --models HOSTILE M1 M2 --duration 120
- adapter_scaling: one rate over the first 8, 16, 64, 256 adapters of ``--models`` (``--counts``),
  uniform and zipf:1.2 (``--mixes``): TTFT p50/p99 of each against the 8-adapter run of its mix.
  Run it against servers with ``--max-loras 8`` and ``16`` (and ``--max-cpu-loras`` below the
  count) to see what more active adapters than slots cost.

    python -m loraplex.loadtest.scenarios adapter_scaling --url ... --rate 0.8 --models A0 ... A255

Each prints its numbers and writes them as JSON (``--out``). ``--capacity`` comes from
``loraplex loadtest --find-capacity``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

from .churn import ChurnConfig
from .client import RequestResult
from .costly_grammar import HOSTILE_KINDS
from .runner import RunConfig, num_requests_for, report, run_with_churn
from .stats import in_flight_during_decode, percentile
from .workload import WorkloadConfig


# The scenarios whose rates are fractions of ``--capacity``
CAPACITY_SCENARIOS = ("overload", "fairness", "soak", "chaos", "slow_clients")


def _run(config: RunConfig) -> tuple[list[RequestResult], dict, list[dict]]:
    results, churn_records = asyncio.run(run_with_churn(config))
    return results, report(results, config), churn_records


def _config(args, models: tuple[str, ...], rate: float, adapter_mix: str = "uniform",
            churn: ChurnConfig | None = None, duration_s: float | None = None) -> RunConfig:
    duration = duration_s or args.duration
    workload = WorkloadConfig(models=models, rate=rate, num_requests=num_requests_for(rate, duration, args.warmup),
                              seed=args.seed, adapter_mix=adapter_mix, prompt_len=(args.prompt_len, args.prompt_len),
                              output_len=(args.output_len, args.output_len))
    return RunConfig(url=args.url, workload=workload, duration_s=duration, warmup_s=args.warmup, churn=churn,
                     timeout_s=args.timeout)


def _p99_ms(results: list[RequestResult], attr: str, models: set[str] | None = None) -> float | None:
    values = [getattr(r, attr) for r in results if r.ok and getattr(r, attr) is not None
              and (models is None or r.model in models)]
    return 1000 * percentile(values, 99) if values else None


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator and denominator else None


def overload(args) -> dict:
    models = tuple(args.models)
    out = {"capacity_rps": args.capacity}
    for label, factor in (("unloaded", 0.25), ("overload_3x", 3.0)):
        print(f"== {label}: {factor * args.capacity:.2f} req/s for {args.duration:.0f} s", file=sys.stderr)
        results, summary, _ = _run(_config(args, models, factor * args.capacity))
        measured = [r for r in results if r.sent_at >= args.warmup]
        shed = [r for r in measured if r.error == "http_429"]
        out[label] = {"rate_rps": factor * args.capacity, "sent": len(measured), "completed": summary["completed"],
                      "shed_429": len(shed), "other_errors": summary["failed"] - len(shed),
                      "p99_ttft_ms": _p99_ms(measured, "ttft_s"), "p99_e2e_ms": _p99_ms(measured, "e2e_s"),
                      "p50_shed_response_ms": 1000 * percentile([r.error_after_s for r in shed], 50)
                      if shed else None,
                      "p99_shed_response_ms": 1000 * percentile([r.error_after_s for r in shed], 99)
                      if shed else None,
                      "shed_after_queueing": sum(r.error_after_s > 0.5 for r in shed)}
    base, loaded = out["unloaded"], out["overload_3x"]
    out["admitted_p99_e2e_vs_unloaded"] = _ratio(loaded["p99_e2e_ms"], base["p99_e2e_ms"])
    out["shed_fraction"] = loaded["shed_429"] / max(1, loaded["sent"])
    return out


def _latency_summary(results: list[RequestResult], warmup_s: float, in_flight: bool = True) -> dict:
    """Counts and latencies of the requests sent after the warm-up; with ``in_flight``, what their
    decode shared the engine with (``results`` must be one run's: their times share one origin)."""
    measured = [r for r in results if r.sent_at >= warmup_s]
    done = [r for r in measured if r.ok]

    def ms(values: list[float], q: float) -> float | None:
        return 1000 * percentile(values, q) if values else None

    ttft = [r.ttft_s for r in done if r.ttft_s is not None]
    tpot = [r.tpot_s for r in done if r.tpot_s is not None]
    summary = {"sent": len(measured), "completed": len(done), "errors": len(measured) - len(done),
               "p50_ttft_ms": ms(ttft, 50), "p99_ttft_ms": ms(ttft, 99), "p50_tpot_ms": ms(tpot, 50),
               "p99_e2e_ms": _p99_ms(done, "e2e_s")}
    if in_flight:  # (every completed request, warm-up included: those share the measured ones' steps too)
        summary.update(in_flight_during_decode([(r.sent_at, r.sent_at + r.ttft_s, r.sent_at + r.e2e_s, r.model)
                                                for r in results if r.ok and r.ttft_s is not None
                                                and r.e2e_s is not None]))
    return summary


def lora_overhead(args) -> dict:
    """Base alone vs. adapters at one rate, ``--repeats`` pairs in ABBA order (base first in even
    pairs, adapters first in odd ones, so a machine that speeds up or slows down over the run
    favours neither side); ratios are medians over pairs."""
    import statistics

    phases = {"base": (args.base,), "adapters": tuple(args.models)}
    out: dict = {"rate_rps": args.rate, "adapters": len(args.models), "pairs": []}
    pooled: dict[str, list[RequestResult]] = {label: [] for label in phases}
    for repeat in range(args.repeats):
        pair = {}
        order = list(phases.items())
        for label, models in (order if repeat % 2 == 0 else order[::-1]):
            print(f"== {label} ({len(models)} models) at {args.rate} req/s, pair {repeat + 1}", file=sys.stderr)
            results, _, _ = _run(_config(args, models, args.rate))
            pair[label] = _latency_summary(results, args.warmup)
            pooled[label] += results
        out["pairs"].append(pair)
    out["pooled"] = {label: _latency_summary(results, args.warmup, in_flight=False)
                     for label, results in pooled.items()}
    for label, summary in out["pooled"].items():  # (the runs' clocks differ: the mean of the pairs')
        for key in ("mean_sequences_in_flight", "mean_models_in_flight"):
            values = [p[label][key] for p in out["pairs"] if p[label].get(key) is not None]
            summary[key] = statistics.mean(values) if values else None
    for metric in ("p50_tpot_ms", "p50_ttft_ms", "p99_ttft_ms"):
        ratios = [_ratio(p["adapters"][metric], p["base"][metric]) for p in out["pairs"]]
        ratios = [r for r in ratios if r is not None]
        name = metric.removesuffix("_ms")
        out[f"{name}_adapters_vs_base"] = statistics.median(ratios) if ratios else None
        # every pair's requests together: less swayed by one pair on a slow minute
        out[f"pooled_{name}_adapters_vs_base"] = _ratio(out["pooled"]["adapters"][metric],
                                                        out["pooled"]["base"][metric])
    return out


def adapter_scaling(args) -> dict:
    """One rate over more and more adapters: the first N of ``--models`` for N in ``--counts``."""
    counts = [int(n) for n in args.counts.split(",")]
    if max(counts) > len(args.models):
        raise SystemExit(f"adapter_scaling: --counts up to {max(counts)} needs that many --models")
    out: dict = {"rate_rps": args.rate, "runs": []}
    for mix in args.mixes.split(","):
        first = None
        for count in counts:
            print(f"== {count} adapters, {mix}, {args.rate} req/s", file=sys.stderr)
            results, _, _ = _run(_config(args, tuple(args.models[:count]), args.rate, adapter_mix=mix))
            run = {"adapters": count, "mix": mix, **_latency_summary(results, args.warmup)}
            first = first or run
            run["p99_ttft_vs_first"] = _ratio(run["p99_ttft_ms"], first["p99_ttft_ms"])
            run["p50_ttft_vs_first"] = _ratio(run["p50_ttft_ms"], first["p50_ttft_ms"])
            out["runs"].append(run)
            print(json.dumps(run), file=sys.stderr)
    return out


def fairness(args) -> dict:
    cold = tuple(args.cold)
    per_cold = args.capacity / 12  # cold alone: 0.75x capacity; with the hot adapter: ~1.6x
    out = {"capacity_rps": args.capacity, "cold_rate_each_rps": per_cold, "hot_rate_rps": 10 * per_cold}
    print(f"== cold adapters alone: {len(cold)} x {per_cold:.3f} req/s", file=sys.stderr)
    alone, _, _ = _run(_config(args, cold, per_cold * len(cold)))
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({args.hot: 10.0, **{name: 1.0 for name in cold}}, f)
    models = (args.hot, *cold)
    rate = per_cold * (10 + len(cold))
    print(f"== with the hot adapter at 10x: {rate:.3f} req/s in all", file=sys.stderr)
    mixed, _, _ = _run(_config(args, models, rate, adapter_mix=f"weights:{f.name}"))
    Path(f.name).unlink()
    cold_set = set(cold)
    alone = [r for r in alone if r.sent_at >= args.warmup]
    mixed = [r for r in mixed if r.sent_at >= args.warmup]
    out["cold_alone"] = {"sent": len(alone), "p99_ttft_ms": _p99_ms(alone, "ttft_s"),
                         "p99_e2e_ms": _p99_ms(alone, "e2e_s"), "errors": sum(not r.ok for r in alone)}
    cold_mixed = [r for r in mixed if r.model in cold_set]
    hot_mixed = [r for r in mixed if r.model == args.hot]
    out["cold_with_hot"] = {"sent": len(cold_mixed), "p99_ttft_ms": _p99_ms(cold_mixed, "ttft_s"),
                            "p99_e2e_ms": _p99_ms(cold_mixed, "e2e_s"),
                            "errors": sum(not r.ok for r in cold_mixed)}
    out["hot"] = {"sent": len(hot_mixed), "completed": sum(r.ok for r in hot_mixed),
                  "shed_429": sum(r.error == "http_429" for r in hot_mixed), "p99_e2e_ms": _p99_ms(hot_mixed, "e2e_s")}
    out["cold_p99_e2e_with_hot_vs_alone"] = _ratio(out["cold_with_hot"]["p99_e2e_ms"],
                                                   out["cold_alone"]["p99_e2e_ms"])
    return out


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and all its descendants (Linux /proc)."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
            for children in Path(f"/proc/{current}/task").glob("*/children"):
                todo.extend(int(c) for c in children.read_text().split())
        except OSError:
            continue
    return total


def soak(args) -> dict:
    churn = None
    if args.churn_adapters:
        churn = ChurnConfig(tuple(p.resolve() for p in args.churn_adapters), args.admin_token, args.churn_interval)
    rate = 0.7 * args.capacity
    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def sample() -> None:
        start = time.monotonic()
        while not stop.is_set():
            samples.append((time.monotonic() - start, rss_bytes(args.server_pid)))
            stop.wait(5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    print(f"== soak: {rate:.2f} req/s for {args.minutes:g} min", file=sys.stderr)
    try:
        results, summary, churn_records = _run(_config(args, tuple(args.models), rate, churn=churn,
                                                       duration_s=60 * args.minutes))
    finally:
        stop.set()
        sampler.join()
    after_warmup = [rss for t, rss in samples if t >= args.warmup] or [rss for _, rss in samples]
    out = {"rate_rps": rate, "minutes": args.minutes, "sent": summary["num_prompts"],
           "completed": summary["completed"], "errors": summary["errors"],
           "adapter_loads": len(churn_records), "failed_adapter_loads": sum("error" in r for r in churn_records),
           "p99_ttft_ms": summary["p99_ttft_ms"], "p99_e2e_ms": summary["p99_e2el_ms"],
           "rss_start_mib": after_warmup[0] / 2**20, "rss_end_mib": after_warmup[-1] / 2**20,
           "rss_max_mib": max(after_warmup) / 2**20}
    out["rss_growth_mib"] = out["rss_end_mib"] - out["rss_start_mib"]
    return out


async def _traffic_beside(config: RunConfig, background) -> tuple[list[RequestResult], dict]:
    """The workload of ``config``, with ``background(stop)`` running until it ends; both results."""
    stop = asyncio.Event()
    task = asyncio.ensure_future(background(stop))
    try:
        results, _ = await run_with_churn(config)
    finally:
        stop.set()
    return results, await task


def chaos(args) -> dict:
    from .chaos import ChaosConfig, run_chaos

    rate = 0.5 * args.capacity
    config = _config(args, tuple(args.models), rate)
    print(f"== chaos: {rate:.2f} req/s of good traffic for {args.duration:.0f} s", file=sys.stderr)

    chaos_config = ChaosConfig(args.good_adapter.resolve(), args.admin_token, args.chaos_interval)
    results, chaos_summary = asyncio.run(_traffic_beside(config, lambda stop: run_chaos(args.url, chaos_config, stop)))
    summary = report(results, config)
    return {"rate_rps": rate, "good_sent": summary["num_prompts"], "good_completed": summary["completed"],
            "good_failed": summary["failed"], "good_errors": summary["errors"],
            "p99_ttft_ms": summary["p99_ttft_ms"], "p99_e2e_ms": summary["p99_e2el_ms"],
            "engine_deaths": int(chaos_summary["health_failures"] > 0), **chaos_summary}


def admin_race(args) -> dict:
    from .admin_race import AdminRaceConfig, run_admin_race

    config = AdminRaceConfig(url=args.url, grpc_target=args.grpc_target, admin_token=args.admin_token,
                             sources=tuple(p.resolve() for p in args.race_adapters), duration_s=args.duration,
                             seed=args.seed)
    print(f"== admin race over gRPC for {args.duration:.0f} s", file=sys.stderr)
    return asyncio.run(run_admin_race(config))


def costly_grammar(args) -> dict:
    from .costly_grammar import CostlyGrammarConfig, run_costly_grammar

    config = CostlyGrammarConfig(url=args.url, hostile_model=args.models[0], other_models=tuple(args.models[1:]),
                                 duration_s=args.duration, hostile_kind=args.hostile_kind,
                                 hostile_fields=args.hostile_fields, hostile_repeats=args.hostile_repeats)
    print(f"== costly constraints ({config.hostile_kind}) from {config.hostile_model} beside "
          f"{len(config.other_models)} other tenants for {args.duration:.0f} s", file=sys.stderr)
    return asyncio.run(run_costly_grammar(config))


def slow_clients(args) -> dict:
    from .slow_clients import SlowClientConfig, run_slow_clients

    rate = 0.5 * args.capacity
    models = tuple(args.models)
    out: dict = {"rate_rps": rate}
    # ABBA order, half the duration each: the machine's drift over minutes falls on both sides.
    measured: dict[str, list] = {"with_polite_twins": [], "with_slow_clients": []}
    counts: dict[str, dict] = {}
    for label in ("with_polite_twins", "with_slow_clients", "with_slow_clients", "with_polite_twins"):
        config = _config(args, models, rate, duration_s=args.duration / 2)
        print(f"== steady traffic {label.replace('_', ' ')}: {rate:.2f} req/s for {args.duration / 2:.0f} s",
              file=sys.stderr)
        clients = SlowClientConfig(models[0], polite=label == "with_polite_twins")
        results, phase_counts = asyncio.run(_traffic_beside(config, lambda stop: run_slow_clients(args.url, clients,
                                                                                                  stop)))
        measured[label] += [r for r in results if r.sent_at >= args.warmup]
        counts[label] = {k: counts.get(label, {}).get(k, 0) + v for k, v in phase_counts.items()}
    for label, rs in measured.items():
        out[label] = {"sent": len(rs), "errors": sum(not r.ok for r in rs), "p99_ttft_ms": _p99_ms(rs, "ttft_s"),
                      "p99_e2e_ms": _p99_ms(rs, "e2e_s"), "clients": counts[label]}
    for metric in ("e2e", "ttft"):
        out[f"p99_{metric}_slow_vs_polite"] = _ratio(out["with_slow_clients"][f"p99_{metric}_ms"],
                                                     out["with_polite_twins"][f"p99_{metric}_ms"])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", choices=("overload", "fairness", "soak", "chaos", "slow_clients", "lora_overhead",
                                             "adapter_scaling", "admin_race", "costly_grammar"))
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--capacity", type=float, help="req/s the server sustains within its SLO")
    parser.add_argument("--rate", type=float, help="lora_overhead/adapter_scaling: the fixed arrival rate, req/s")
    parser.add_argument("--base", help="lora_overhead: the base model's name")
    parser.add_argument("--repeats", type=int, default=2, help="lora_overhead: base/adapters pairs")
    parser.add_argument("--counts", default="8,16,64,256", help="adapter_scaling: adapter counts")
    parser.add_argument("--mixes", default="uniform,zipf:1.2", help="adapter_scaling: adapter mixes")
    parser.add_argument("--models", nargs="+", default=(), help="overload/soak: models to spread requests over")
    parser.add_argument("--hot", help="fairness: the adapter sending 10x")
    parser.add_argument("--cold", nargs="+", default=(), help="fairness: the other adapters")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per measured phase")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--prompt-len", type=int, default=64, help="words")
    parser.add_argument("--output-len", type=int, default=16, help="tokens")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--minutes", type=float, default=5.0, help="soak length")
    parser.add_argument("--server-pid", type=int, help="soak: the server's pid, for RSS")
    parser.add_argument("--churn-adapters", type=Path, nargs="*", default=())
    parser.add_argument("--churn-interval", type=float, default=5.0)
    parser.add_argument("--admin-token", default=None)
    parser.add_argument("--good-adapter", type=Path, default=None, help="chaos: a valid adapter the bad ones copy")
    parser.add_argument("--chaos-interval", type=float, default=3.0, help="chaos: seconds between actions")
    parser.add_argument("--race-adapters", type=Path, nargs="*", default=(),
                        help="admin_race: adapter directories its names are loaded from")
    parser.add_argument("--grpc-target", default="127.0.0.1:50051", help="admin_race: the gRPC door, host:port")
    parser.add_argument("--hostile-fields", type=int, default=200,
                        help="costly_grammar: bounded strings in each hostile schema")
    parser.add_argument("--hostile-kind", choices=HOSTILE_KINDS, default="compile",
                        help="costly_grammar: schemas slow to compile, or regexes slow to enforce")
    parser.add_argument("--hostile-repeats", type=int, default=120,
                        help="costly_grammar --hostile-kind mask: nested repetitions in each hostile regex")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the numbers")
    args = parser.parse_args(argv)
    fixed_rate = args.scenario in ("lora_overhead", "adapter_scaling")
    if fixed_rate and (args.rate is None or args.rate <= 0 or not args.models):
        parser.error(f"{args.scenario} needs --rate and --models")
    if args.scenario == "admin_race" and (not args.race_adapters or not args.admin_token):
        parser.error("admin_race needs --race-adapters and --admin-token")
    if args.scenario in CAPACITY_SCENARIOS and args.capacity is None:
        parser.error(f"{args.scenario} needs --capacity")
    if args.scenario == "lora_overhead" and not args.base:
        parser.error("lora_overhead needs --base")
    if args.scenario == "chaos" and (not args.good_adapter or not args.admin_token or not args.models):
        parser.error("chaos needs --models, --good-adapter and --admin-token")
    if args.scenario == "costly_grammar" and (len(args.models) < 2 or args.hostile_fields < 1
                                              or args.hostile_repeats < 1):
        parser.error("costly_grammar needs --models HOSTILE OTHER..., --hostile-fields >= 1 and "
                     "--hostile-repeats >= 1")
    if args.scenario in ("overload", "soak", "slow_clients") and not args.models:
        parser.error(f"{args.scenario} needs --models")
    if args.scenario == "fairness" and (not args.hot or not args.cold):
        parser.error("fairness needs --hot and --cold")
    if args.scenario == "soak" and args.server_pid is None:
        parser.error("soak needs --server-pid")
    if args.churn_adapters and not args.admin_token:
        parser.error("--churn-adapters needs --admin-token")
    result = {"overload": overload, "fairness": fairness, "soak": soak, "chaos": chaos,
              "slow_clients": slow_clients, "lora_overhead": lora_overhead,
              "adapter_scaling": adapter_scaling, "admin_race": admin_race,
              "costly_grammar": costly_grammar}[args.scenario](args)
    result = {"scenario": args.scenario, **result}
    print(json.dumps(result, indent=2))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
