"""Token -> adapter-slot assignments for kernel tests and benchmarks.

Popularity models follow Punica's kernel tests: ``distinct`` (every request its own adapter),
``uniform``, ``zipf`` (alpha 1.5), ``identical`` (one adapter for all), ``skewed`` (one long
request plus many one-token requests on other adapters, the shape that once deadlocked a kernel).
"""

from __future__ import annotations

import torch

POPULARITIES = ("distinct", "uniform", "zipf", "identical", "skewed")


def _request_lengths(num_tokens: int, num_requests: int, generator: torch.Generator) -> list[int]:
    num_requests = max(1, min(num_requests, num_tokens))
    cuts = torch.randperm(num_tokens - 1, generator=generator)[: num_requests - 1].add(1).sort().values.tolist()
    bounds = [0, *cuts, num_tokens]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def token_slots(num_tokens: int, num_adapters: int, popularity: str, *, seed: int = 0,
                no_adapter_fraction: float = 0.1, num_requests: int | None = None) -> torch.Tensor:
    """Slots [num_tokens] int64; tokens of one request are contiguous; ~``no_adapter_fraction``
    of requests use no adapter (-1)."""
    if popularity not in POPULARITIES:
        raise ValueError(f"popularity must be one of {POPULARITIES}")
    generator = torch.Generator().manual_seed(seed)
    if popularity == "skewed":
        long_len = max(1, num_tokens - num_tokens // 4)
        lengths = [long_len] + [1] * (num_tokens - long_len)
    else:
        lengths = _request_lengths(num_tokens, num_requests or max(num_adapters, num_tokens // 8), generator)
    n = len(lengths)
    if popularity == "distinct" or popularity == "skewed":
        adapters = torch.arange(n) % num_adapters
    elif popularity == "uniform":
        adapters = torch.randint(0, num_adapters, (n,), generator=generator)
    elif popularity == "zipf":
        weights = 1.0 / torch.arange(1, num_adapters + 1, dtype=torch.float64) ** 1.5
        adapters = torch.multinomial(weights, n, replacement=True, generator=generator)
    else:  # identical
        adapters = torch.zeros(n, dtype=torch.long)
    no_adapter = torch.rand(n, generator=generator) < no_adapter_fraction
    adapters = torch.where(no_adapter, torch.full_like(adapters, -1), adapters)
    return torch.repeat_interleave(adapters, torch.tensor(lengths))
