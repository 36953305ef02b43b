"""Arrival processes (no I/O): when each request of an open-loop run is sent."""

from __future__ import annotations

import numpy as np


def inter_arrival_times(rate: float, num_requests: int, rng: np.random.Generator,
                        burstiness: float = 1.0) -> np.ndarray:
    """Gaps between requests for a target ``rate`` (requests/s).

    ``burstiness`` = 1 is a Poisson process (exponential gaps); other values draw gamma gaps with
    shape ``burstiness`` and the same mean 1/rate (< 1 burstier, > 1 more regular), as
    ``vllm bench serve`` does.
    """
    if rate <= 0:
        raise ValueError("rate must be positive")
    if burstiness <= 0:
        raise ValueError("burstiness must be positive")
    return rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=num_requests)


def send_times(rate: float, num_requests: int, seed: int, burstiness: float = 1.0) -> np.ndarray:
    """Offsets (s) from the start of the run at which each request is sent; the first at 0."""
    gaps = inter_arrival_times(rate, num_requests, np.random.default_rng(seed), burstiness)
    return np.concatenate([[0.0], np.cumsum(gaps[:-1])]) if num_requests else np.zeros(0)
