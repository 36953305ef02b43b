"""PNG of latency percentiles against arrival rate, with the SLO line."""

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
