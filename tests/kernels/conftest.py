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


def check_against_reference(run, rank: int, num_tokens: int, num_adapters: int, popularity: str,
                            dtype: torch.dtype) -> None:
    """``run(out, x, lora_a, lora_b, slots, scale, offset_start)`` (in place on ``out``) against the
    reference on one workload; tokens without an adapter must stay bit-identical."""
    from loraplex.kernels import reference
    from loraplex.kernels.workloads import token_slots

    seed = rank * 1000 + num_tokens * 10 + num_adapters
    slots = token_slots(num_tokens, num_adapters, popularity, seed=seed)
    lora_a, lora_b = make_weights(num_adapters, rank, dtype, seed)
    x = torch.randn(num_tokens, HIDDEN_IN, generator=torch.Generator().manual_seed(seed)).to(dtype)
    base = torch.randn(num_tokens, sum(SLICE_WIDTHS) + 8).to(dtype)
    expected = reference.add_lora_linear(base.clone(), x, lora_a, lora_b, slots, 0.5, SLICE_WIDTHS, offset_start=4)
    actual = base.clone()
    run(actual, x, lora_a, lora_b, slots, 0.5, 4)
    torch.testing.assert_close(actual, expected, **tolerances(dtype))
    untouched = slots == -1
    assert torch.equal(actual[untouched], base[untouched]), "a no-adapter token was modified"


def tolerances(dtype: torch.dtype) -> dict:
    return {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 5e-2, "rtol": 2e-2}


@pytest.fixture(params=DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def dtype(request):
    return request.param
