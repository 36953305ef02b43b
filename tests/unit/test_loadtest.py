"""Load-tester pieces with no server: arrivals, percentiles, workload, SLO parsing."""

import numpy as np
import pytest
from scipy import stats as scipy_stats

from loraplex.loadtest.arrivals import inter_arrival_times, send_times
from loraplex.loadtest.client import RequestResult
from loraplex.loadtest.runner import SLO, check_target
from loraplex.loadtest.stats import in_flight_during_decode, percentile, summarize_ms
from loraplex.loadtest.workload import WorkloadConfig, build_requests


@pytest.mark.parametrize("rate", [0.5, 4.0, 50.0])
def test_poisson_gaps_match_the_rate_and_are_exponential(rate):
    gaps = inter_arrival_times(rate, 20000, np.random.default_rng(1))
    assert abs(gaps.mean() - 1 / rate) < 0.03 / rate
    assert scipy_stats.kstest(gaps, "expon", args=(0, 1 / rate)).pvalue > 0.01


def test_gamma_burstiness_keeps_the_mean_and_changes_the_spread():
    rng = np.random.default_rng(2)
    bursty = inter_arrival_times(10.0, 20000, rng, burstiness=0.25)
    regular = inter_arrival_times(10.0, 20000, rng, burstiness=4.0)
    assert abs(bursty.mean() - 0.1) < 0.005 and abs(regular.mean() - 0.1) < 0.005
    assert bursty.std() > 0.15 > 0.06 > regular.std()  # CV 2 vs 0.5
    assert scipy_stats.kstest(bursty, "gamma", args=(0.25, 0, 0.1 / 0.25)).pvalue > 0.01


def test_send_times_start_at_zero_and_increase():
    times = send_times(5.0, 100, seed=3)
    assert times[0] == 0 and np.all(np.diff(times) > 0)
    assert np.array_equal(times, send_times(5.0, 100, seed=3))


@pytest.mark.parametrize("q", [0, 1, 50, 90, 95, 99, 100])
def test_percentiles_match_numpy(q):
    values = list(np.random.default_rng(4).lognormal(size=257))
    assert percentile(values, q) == pytest.approx(np.percentile(values, q))
    summary = summarize_ms("ttft", values)
    assert summary["p99_ttft_ms"] == pytest.approx(1000 * np.percentile(values, 99))
    assert summary["median_ttft_ms"] == pytest.approx(1000 * np.median(values))


def test_workload_is_reproducible_and_follows_the_mix():
    config = WorkloadConfig(models=("a", "b", "c", "d"), rate=10, num_requests=4000, seed=5, adapter_mix="zipf:1.5",
                            prompt_len=(4, 8), output_len=(2, 3))
    first, second = build_requests(config), build_requests(config)
    assert first == second
    counts = [sum(1 for r in first if r.model == m) for m in "abcd"]
    assert counts == sorted(counts, reverse=True) and counts[0] > 2 * counts[1]
    assert all(4 <= len(r.prompt.split()) <= 8 and 2 <= r.max_tokens <= 3 for r in first)


def test_slo_parsing_and_verdict():
    slo = SLO.parse("ttft=200ms,e2e=1.5s")
    assert slo == SLO(0.2, 1.5)
    ok = RequestResult(0, "m", 0.0, ok=True, ttft_s=0.1, e2e_s=1.0)
    slow = RequestResult(1, "m", 0.0, ok=True, ttft_s=0.3, e2e_s=1.0)
    assert slo.met_by(ok) and not slo.met_by(slow)
    with pytest.raises(ValueError):
        SLO.parse("latency=1s")


def test_only_loopback_targets_by_default():
    check_target("http://127.0.0.1:8000", False)
    check_target("http://localhost:8000", False)
    check_target("grpc://127.0.0.1:50051", False)
    with pytest.raises(ValueError, match="grpc://"):
        check_target("ftp://127.0.0.1:21", False)
    with pytest.raises(ValueError, match="loopback"):
        check_target("http://10.0.0.5:8000", False)


def test_capacity_bisection_brackets_the_threshold():
    from loraplex.loadtest.capacity import find_capacity

    threshold = 3.3
    found = find_capacity(lambda rate: rate <= threshold, rate_min=0.5, rate_max=8.0, steps=5)
    assert found.capacity_rate <= threshold < found.capacity_rate + (8.0 - 0.5) / 2 ** 5
    assert [rate for rate, _ in found.steps][:2] == [8.0, 0.5] and len(found.steps) == 7
    assert find_capacity(lambda rate: True, 0.5, 8.0, 5).capacity_rate == 8.0
    assert find_capacity(lambda rate: False, 0.5, 8.0, 5).capacity_rate is None


def test_weights_file_mix(tmp_path):
    import json

    path = tmp_path / "weights.json"
    path.write_text(json.dumps({"hot": 9, "cold": 1, "never": 0}))
    config = WorkloadConfig(models=("hot", "cold", "never"), rate=10, num_requests=2000, seed=1,
                            adapter_mix=f"weights:{path}")
    counts = {m: sum(1 for r in build_requests(config) if r.model == m) for m in ("hot", "cold", "never")}
    assert counts["never"] == 0 and 0.85 < counts["hot"] / 2000 < 0.95


def test_plot_is_a_png_with_the_slo_line(tmp_path):
    from PIL import Image

    from loraplex.loadtest.plot import plot_latency_vs_rate

    runs = [{"request_rate": r, "median_ttft_ms": 50 * r, "p99_ttft_ms": 90 * r, "p99_e2el_ms": 400 * r}
            for r in (1, 2, 4)]
    path = plot_latency_vs_rate(runs, tmp_path / "plot.png", slo_ttft_ms=200)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        assert image.size == (700, 450)


def test_single_rate_plot_shows_requests_over_time_and_their_cdf(tmp_path):
    from PIL import Image

    from loraplex.loadtest.plot import plot_single_run

    requests = [(0.5 * i, 0.05 + 0.01 * (i % 7), 0.4 + 0.05 * (i % 5)) for i in range(40)] + [(3.0, None, None)]
    path = plot_single_run(requests, tmp_path / "latency.png", slo_ttft_ms=200, slo_e2e_ms=2000, title="1 req/s")
    with Image.open(path) as image:
        assert image.size == (1100, 450)
        # both panels drew something: the image is far from one flat colour
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or ()) > 20


def test_closed_loop_gets_enough_requests_whatever_the_rate():
    from loraplex.loadtest.runner import closed_loop_requests

    # 4 workers for 35 s never exhaust the sequence, even at 100 requests/s each
    assert closed_loop_requests(4, 30, 5) >= 4 * 100 * 35


def test_closed_loop_specs_ignore_the_rate_sized_request_count():
    from loraplex.loadtest.runner import RunConfig, request_specs
    from loraplex.loadtest.workload import WorkloadConfig

    workload = WorkloadConfig(models=("m",), rate=0.1, num_requests=2, prompt_len=(1, 1))
    assert len(request_specs(RunConfig(url="http://127.0.0.1:1", workload=workload, duration_s=1))) == 2
    closed = RunConfig(url="http://127.0.0.1:1", workload=workload, duration_s=1, concurrency=2)
    assert len(request_specs(closed)) >= 2 * 100 * 1


def _result(index, model, sent_at, ok=True, ttft=0.2, e2e=1.0, tokens=16):
    return RequestResult(index=index, model=model, sent_at=sent_at, ok=ok, ttft_s=ttft if ok else None,
                         e2e_s=e2e if ok else None, output_tokens=tokens, error=None if ok else "http_5xx")


def test_latency_summary_leaves_out_the_warmup_and_counts_errors():
    from loraplex.loadtest.scenarios import _latency_summary

    results = [_result(0, "a", 0.5, ttft=9.0, e2e=20.0)]  # warm-up: left out
    results += [_result(i, "a", 5.0 + i, ttft=0.1 * i, e2e=0.1 * i + 1.5) for i in range(1, 11)]
    results.append(_result(11, "a", 20.0, ok=False))
    summary = _latency_summary(results, warmup_s=5.0)
    assert summary["sent"] == 11 and summary["completed"] == 10 and summary["errors"] == 1
    assert summary["p50_ttft_ms"] == pytest.approx(1000 * percentile([0.1 * i for i in range(1, 11)], 50))
    assert summary["p50_tpot_ms"] == pytest.approx(100.0)  # (e2e - ttft) / (16 - 1) = 1.5 s / 15
    assert summary["p99_ttft_ms"] < 9000
    assert summary["mean_models_in_flight"] == 1.0 < summary["mean_sequences_in_flight"]  # one model, overlapping


def test_in_flight_during_decode_weighs_each_decode_by_time():
    a, b, c = (0.0, 1.0, 4.0, "m0"), (1.0, 2.0, 6.0, "m1"), (3.0, 5.0, 9.0, "m0")
    got = in_flight_during_decode([a, b, c])
    # a decodes 1-4: a+b for 2 s, a+b+c (two models) for 1 s; b decodes 2-6: a+b 1 s, a+b+c 1 s,
    # b+c 2 s; c decodes 5-9: b+c 1 s, c alone 3 s
    per_request_sequences = [(2 * 2 + 3 * 1) / 3, (2 * 1 + 3 * 1 + 2 * 2) / 4, (2 * 1 + 1 * 3) / 4]
    per_request_models = [2.0, 2.0, (2 * 1 + 1 * 3) / 4]
    assert got["mean_sequences_in_flight"] == pytest.approx(sum(per_request_sequences) / 3)
    assert got["mean_models_in_flight"] == pytest.approx(sum(per_request_models) / 3)
    alone = in_flight_during_decode([(0.0, 0.5, 2.0, "m0"), (5.0, 5.5, 7.0, "m1")])
    assert alone == {"mean_sequences_in_flight": 1.0, "mean_models_in_flight": 1.0}
    assert in_flight_during_decode([(0.0, 1.0, 1.0, "m0")])["mean_models_in_flight"] is None  # no decode


@pytest.mark.parametrize("argv, message", [
    (["lora_overhead", "--models", "a"], "needs --rate"),
    (["lora_overhead", "--rate", "1", "--models", "a"], "needs --base"),
    (["adapter_scaling", "--rate", "1"], "needs --rate and --models"),
    (["overload", "--models", "m"], "needs --capacity"),
    (["admin_race", "--admin-token", "t"], "needs --race-adapters and --admin-token"),
    (["costly_grammar", "--models", "only-one"], "costly_grammar needs --models HOSTILE OTHER"),
    (["costly_grammar", "--models", "a", "b", "--hostile-fields", "0"], "--hostile-fields >= 1"),
    (["costly_grammar", "--models", "a", "b", "--hostile-repeats", "0"], "--hostile-repeats >= 1"),
])
def test_scenario_arguments_are_checked_before_any_request(argv, message, capsys):
    from loraplex.loadtest.scenarios import main

    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err


def test_adapter_scaling_needs_as_many_models_as_its_largest_count():
    import argparse

    from loraplex.loadtest.scenarios import adapter_scaling

    with pytest.raises(SystemExit, match="needs that many --models"):
        adapter_scaling(argparse.Namespace(counts="8,16", models=["a"] * 8, rate=1.0, mixes="uniform"))


def test_lora_overhead_alternates_abba_and_pools_every_pair(monkeypatch):
    """Pairs run base-first, then adapters-first (a drifting machine favours neither side); the
    pooled ratio takes every pair's requests together, the other is the median of the pairs'."""
    import argparse

    from loraplex.loadtest import scenarios

    order, run = [], iter(range(100))

    def fake_run(config):
        side = "base" if config.models == ("base",) else "adapters"
        order.append(side)
        slow = 2.0 if next(run) == 0 else 1.0  # the first run lands on a slow minute
        ttft = (0.2 if side == "base" else 0.25) * slow
        return [_result(i, config.models[0], 5.0 + i, ttft=ttft, e2e=ttft + 1.5) for i in range(10)], {}, []

    monkeypatch.setattr(scenarios, "_run", fake_run)
    monkeypatch.setattr(scenarios, "_config", lambda args, models, rate: argparse.Namespace(models=models))
    out = scenarios.lora_overhead(argparse.Namespace(base="base", models=["a0", "a1"], rate=1.0, repeats=4,
                                                     warmup=5.0))
    assert order == ["base", "adapters", "adapters", "base"] * 2
    assert len(out["pairs"]) == 4 and out["pooled"]["base"]["completed"] == 40
    assert out["p50_ttft_adapters_vs_base"] == pytest.approx(1.25)  # median of 0.625, 1.25, 1.25, 1.25
    assert out["pooled_p50_ttft_adapters_vs_base"] == pytest.approx(1.25)
    # each run's clock starts at 0: pooled, what a decode shared is the pairs' mean, not every run's overlap
    pairs_in_flight = [p["adapters"]["mean_sequences_in_flight"] for p in out["pairs"]]
    pooled_in_flight = out["pooled"]["adapters"]["mean_sequences_in_flight"]
    assert pooled_in_flight == pytest.approx(sum(pairs_in_flight) / 4) and 1.0 < pooled_in_flight < 3


@pytest.mark.parametrize("argv", (["--adapter", "a", "--examples", "0"], ["--adapter", "a", "--repeats", "0"], []))
def test_eval_benchmark_checks_its_arguments_before_loading_anything(argv, capsys):
    from loraplex.loadtest.bench_eval import main

    with pytest.raises(SystemExit):
        main(argv)
    assert "error" in capsys.readouterr().err


def test_eval_benchmark_refuses_a_wrong_adapter_in_one_line(tmp_path, capsys):
    """The server's adapter checks run before any engine: a directory with no adapter is an
    argument error naming what is missing."""
    from loraplex.loadtest.bench_eval import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--adapter", str(tmp_path), "--cache-dir", str(tmp_path / "cache")])
    assert exit_info.value.code == 2
    assert "adapter_config.json is missing" in capsys.readouterr().err


def test_admin_race_verdict_counts_server_faults_stuck_loads_and_leaked_engine_entries():
    from collections import Counter

    from loraplex.loadtest.admin_race import race_verdict

    codes = Counter({("load", "OK"): 3, ("load", "DEADLINE_EXCEEDED"): 5, ("unload", "INTERNAL"): 1,
                     ("generate", "UNKNOWN"): 2, ("generate", "NOT_FOUND"): 4})
    listing = [{"name": "a", "status": "ready"}, {"name": "race-a", "status": "loading"}]
    metrics = {'loraplex:adapters{state="ready"}': 1.0, 'loraplex:adapters_resident{tier="cpu"}': 3.0}
    verdict = race_verdict(codes, listing, metrics, 200)
    assert verdict["server_faults"] == 3 and verdict["left_loading"] == ["race-a"]
    assert verdict["leaked_engine_entries"] == 2.0 and verdict["calls"]["load DEADLINE_EXCEEDED"] == 5
    one_resident = {**metrics, 'loraplex:adapters_resident{tier="cpu"}': 1.0}
    clean = race_verdict(Counter({("load", "OK"): 1}), listing[:1], one_resident, 200)
    assert clean["server_faults"] == 0 and clean["left_loading"] == [] and clean["leaked_engine_entries"] == 0


def test_costly_grammar_verdict_counts_server_errors_and_summarises_each_kind():
    import json

    import re

    from loraplex.loadtest.costly_grammar import costly_mask_regex, costly_schema, grammar_verdict

    records = [{"kind": "hostile", "status": 400, "latency_s": 12.0},
               {"kind": "hostile", "status": 503, "latency_s": 1.0},
               {"kind": "light_schema", "status": 200, "latency_s": 2.0},
               {"kind": "light_schema", "status": 200, "latency_s": 4.0},
               {"kind": "plain", "status": 0, "latency_s": 9.0}]
    verdict = grammar_verdict(records, health_failures=1)
    assert verdict["server_errors"] == 2 and verdict["health_failures"] == 1
    assert verdict["hostile"]["statuses"] == {"400": 1, "503": 1}
    assert verdict["light_schema"]["max_s"] == 4.0 and verdict["light_schema"]["p50_s"] == 3.0  # (interpolated)
    assert verdict["plain"]["p99_s"] == 9.0
    assert verdict["plain"]["sent"] == 1
    schema = costly_schema(200, "x")
    assert len(schema["properties"]) == 200 and len(json.dumps(schema)) < 32 << 10  # inside the server's bound
    regex = costly_mask_regex(120, "x")
    assert regex == "x([^x]*){120}" and re.fullmatch(regex, "xab c")  # valid, and matches text
