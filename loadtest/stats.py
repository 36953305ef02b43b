"""Latency statistics (no I/O)."""

from __future__ import annotations

from collections.abc import Sequence

from loraplex.server.stats import percentile

PERCENTILES = (50, 90, 95, 99)
__all__ = ["PERCENTILES", "percentile", "summarize_ms"]


def summarize_ms(name: str, seconds: Sequence[float]) -> dict[str, float]:
    """``mean_<name>_ms``, ``median_<name>_ms``, ``p99_<name>_ms`` ... as ``vllm bench serve`` names them."""
    values = [1000.0 * s for s in seconds]
    out = {f"mean_{name}_ms": sum(values) / len(values) if values else float("nan"),
           f"median_{name}_ms": percentile(values, 50)}
    for q in PERCENTILES:
        out[f"p{q}_{name}_ms"] = percentile(values, q)
    return out
