"""Tenant isolation for batched-LoRA ops: a slot holding NaN/Inf weights (in the batch or idle)
must leave every other token bit-identical. Shared by the CPU and Triton op tests."""

from __future__ import annotations

import torch

from loraplex.kernels.workloads import token_slots

from .conftest import HIDDEN_IN, SLICE_WIDTHS, make_weights

POISONS = (float("nan"), float("inf"))


def isolation_case(num_tokens: int, popularity: str, poison: float, bad_in_batch: bool, seed: int = 0):
    """(slots, x, clean weights, poisoned weights, bad slot). With ``bad_in_batch`` False the bad
    slot has no token but lies between used slots (so padded groups span it)."""
    num_slots = 5
    slots = token_slots(num_tokens, num_slots - 1, popularity, seed=seed)
    bad = 1
    if bad_in_batch:
        slots = torch.where(slots == 0, torch.full_like(slots, bad), slots)  # slot 1 certainly used
        if not bool((slots == bad).any()):
            slots[0] = bad
    else:
        slots = torch.where(slots >= bad, slots + 1, slots)  # slots 0, 2, 3, 4 only
        slots[-1] = num_slots - 1  # at least one token beyond the bad slot
    lora_a, lora_b = make_weights(num_slots, 16, torch.float32, seed)
    bad_a = [a.clone() for a in lora_a]
    bad_b = [b.clone() for b in lora_b]
    for tensor in (*bad_a, *bad_b):
        tensor[bad] = poison
    x = torch.randn(num_tokens, HIDDEN_IN, generator=torch.Generator().manual_seed(seed))
    return slots, x, (lora_a, lora_b), (bad_a, bad_b), bad


def assert_others_identical(slots: torch.Tensor, clean: torch.Tensor, poisoned: torch.Tensor, bad: int) -> None:
    others = slots != bad
    assert torch.equal(clean[others], poisoned[others]), "a bad slot changed another slot's tokens"
    assert torch.isfinite(poisoned[others]).all()


def base_output(num_tokens: int) -> torch.Tensor:
    return torch.randn(num_tokens, sum(SLICE_WIDTHS), generator=torch.Generator().manual_seed(7))
