"""Capacity search: the highest arrival rate whose p99 still meets the SLO (bisection; every
step is one bounded run)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class CapacityResult:
    capacity_rate: float | None       # highest passing rate found (None: even the lowest failed)
    steps: list[tuple[float, bool]]   # (rate, SLO met) in the order tried


def find_capacity(run_at: Callable[[float], bool], rate_min: float, rate_max: float, steps: int) -> CapacityResult:
    """``run_at(rate) -> SLO met?``. Tries ``rate_max`` first (done if it passes), then ``rate_min``,
    then bisects between the highest pass and the lowest fail ``steps`` times."""
    tried: list[tuple[float, bool]] = []

    def attempt(rate: float) -> bool:
        ok = run_at(rate)
        tried.append((rate, ok))
        return ok

    if attempt(rate_max):
        return CapacityResult(rate_max, tried)
    if not attempt(rate_min):
        return CapacityResult(None, tried)
    low, high = rate_min, rate_max
    for _ in range(steps):
        middle = (low + high) / 2
        if attempt(middle):
            low = middle
        else:
            high = middle
    return CapacityResult(low, tried)
