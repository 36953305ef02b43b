"""Latency statistics (no I/O)."""

from __future__ import annotations

from collections.abc import Sequence

from loraplex.server.stats import percentile

PERCENTILES = (50, 90, 95, 99)
__all__ = ["PERCENTILES", "in_flight_during_decode", "percentile", "summarize_ms"]


def summarize_ms(name: str, seconds: Sequence[float]) -> dict[str, float]:
    """``mean_<name>_ms``, ``median_<name>_ms``, ``p99_<name>_ms`` ... as ``vllm bench serve`` names them."""
    values = [1000.0 * s for s in seconds]
    out = {f"mean_{name}_ms": sum(values) / len(values) if values else float("nan"),
           f"median_{name}_ms": percentile(values, 50)}
    for q in PERCENTILES:
        out[f"p{q}_{name}_ms"] = percentile(values, q)
    return out


def in_flight_during_decode(requests: Sequence[tuple[float, float, float, str]]) -> dict[str, float | None]:
    """What a request's decode steps shared the engine with, from the client's clock.

    ``requests``: (sent, first_token, done, model) per completed request, in seconds. For each
    request, over its decode (first token to done), the time-weighted mean of the requests in
    flight (sent to done, itself included) and of the distinct models among them; both averaged
    over the requests. Each distinct adapter in a step is read from memory once that step, so the
    second number is what a LoRA step's extra bytes scale with."""
    sequences, models = [], []
    for sent, first, done, model in requests:
        if done <= first:
            continue
        overlapping = [(max(s, first), min(d, done), m) for s, _, d, m in requests if s < done and d > first]
        cuts = sorted({first, done} | {t for s, d, _ in overlapping for t in (s, d)})
        seq_time = model_time = 0.0
        for left, right in zip(cuts, cuts[1:]):
            present = [m for s, d, m in overlapping if s <= left and d >= right]
            seq_time += (right - left) * len(present)
            model_time += (right - left) * len(set(present))
        sequences.append(seq_time / (done - first))
        models.append(model_time / (done - first))
    if not sequences:
        return {"mean_sequences_in_flight": None, "mean_models_in_flight": None}
    return {"mean_sequences_in_flight": sum(sequences) / len(sequences),
            "mean_models_in_flight": sum(models) / len(models)}
