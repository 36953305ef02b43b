"""PNGs of a load test: latency percentiles against arrival rate (several rates), or, for one
rate, each request's TTFT and e2e over the run and their distribution (CDF); SLO lines on both."""

from __future__ import annotations

from pathlib import Path


def plot_latency_vs_rate(results: list[dict], out_path: Path, slo_ttft_ms: float | None = None) -> Path:
    """One point per run (x = its request rate): TTFT p50/p99 and e2e p99."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted(results, key=lambda r: r["request_rate"])
    rates = [r["request_rate"] for r in runs]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for key, label, style in (("median_ttft_ms", "TTFT p50", "o-"), ("p99_ttft_ms", "TTFT p99", "s-"),
                              ("p99_e2el_ms", "e2e p99", "^--")):
        ax.plot(rates, [r[key] for r in runs], style, label=label)
    if slo_ttft_ms is not None:
        ax.axhline(slo_ttft_ms, color="red", linewidth=1.5, label=f"SLO TTFT {slo_ttft_ms:g} ms")
    ax.set_xlabel("arrival rate (requests/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title("loraplex loadtest: latency vs rate")
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, format="png")
    plt.close(fig)
    return out_path


def plot_single_run(requests: list[tuple[float, float | None, float | None]], out_path: Path,
                    slo_ttft_ms: float | None = None, slo_e2e_ms: float | None = None, title: str = "") -> Path:
    """``requests``: (sent at, s from the start; TTFT s; e2e s) of each successful request. Left:
    both over the run's time (drift, warm-up, bursts show); right: their CDFs (the tail shows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (over_time, cdf) = plt.subplots(1, 2, figsize=(11, 4.5), dpi=100)
    series = (("TTFT", 1, slo_ttft_ms, "tab:blue"), ("e2e", 2, slo_e2e_ms, "tab:orange"))
    for label, column, slo, color in series:
        points = sorted((r[0], 1000 * r[column]) for r in requests if r[column] is not None)
        if not points:
            continue
        over_time.plot([p[0] for p in points], [p[1] for p in points], ".", color=color, markersize=4, label=label)
        values = sorted(p[1] for p in points)
        cdf.plot(values, [(i + 1) / len(values) for i in range(len(values))], "-", color=color, label=label)
        if slo is not None:
            for ax in (over_time, cdf):
                (ax.axhline if ax is over_time else ax.axvline)(slo, color=color, linestyle="--", linewidth=1.2,
                                                                 label=f"SLO {label} {slo:g} ms")
    over_time.set_xlabel("request sent at (s from start)")
    over_time.set_ylabel("latency (ms)")
    over_time.set_yscale("log")
    cdf.set_xlabel("latency (ms)")
    cdf.set_ylabel("share of requests")
    cdf.set_xscale("log")
    cdf.set_ylim(0, 1.01)
    for ax in (over_time, cdf):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    over_time.set_title("each request over the run")
    cdf.set_title("distribution (CDF)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, format="png")
    plt.close(fig)
    return out_path
