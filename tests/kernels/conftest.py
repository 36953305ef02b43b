import os

import torch

if not torch.cuda.is_available():
    # Only the kernel tests: Triton ops run in the interpreter on CPU; it must be on before
    # anything imports triton. (Servers started by the integration tests never see it.)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


RANKS = (8, 16, 64)
NUM_TOKENS = (1, 7, 128, 600)
NUM_ADAPTERS = (1, 4, 32)
DTYPES = (torch.float32, torch.bfloat16)
HIDDEN_IN = 128
SLICE_WIDTHS = (96, 32, 32)  # a q/k/v-like fused projection


def make_weights(num_slots: int, rank: int, dtype: torch.dtype, seed: int):
    """vLLM's stacked layout: A [S, 1, R, H_in] and B [S, 1, N, R] per slice, values O(1)."""
    g = torch.Generator().manual_seed(seed)
    lora_a = [(torch.randn(num_slots, 1, rank, HIDDEN_IN, generator=g) / HIDDEN_IN ** 0.5).to(dtype)
              for _ in SLICE_WIDTHS]
    lora_b = [(torch.randn(num_slots, 1, width, rank, generator=g) / rank ** 0.5).to(dtype)
              for width in SLICE_WIDTHS]
    return lora_a, lora_b


def tolerances(dtype: torch.dtype) -> dict:
    return {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 5e-2, "rtol": 2e-2}


@pytest.fixture(params=DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def dtype(request):
    return request.param
