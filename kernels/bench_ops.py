"""Op-level CPU microbenchmark: one fused q/k/v LoRA call (``add_lora_linear``) through vLLM's
stock CPU punica wrapper, through ours with the torch ops only and with the compiled op for small
steps, and through the pure-torch reference (small batches only).

    python -m loraplex.kernels.bench_ops --out bench-results/ops.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from . import reference
from .workloads import token_slots

# SmolLM2-135M's fused q/k/v projection: hidden 576 -> 576 + 192 + 192.
HIDDEN = 576
SLICES = (576, 192, 192)
CASES = [  # (name, tokens, is_prefill, popularity, requests; None: tokens // 8, at least one per adapter)
    ("decode-1", 1, False, "distinct", 1),
    ("decode-8-distinct", 8, False, "distinct", 8),
    ("decode-32-distinct", 32, False, "distinct", 32),
    ("prefill-40-one-adapter", 40, True, "identical", 1),
    ("decode-64-distinct", 64, False, "distinct", 64),
    ("decode-64-zipf", 64, False, "zipf", 64),
    ("prefill-1024-uniform", 1024, True, "uniform", None),
    ("prefill-4096-distinct", 4096, True, "distinct", 32),
    ("prefill-2048-identical", 2048, True, "identical", None),
    ("mixed-512-skewed", 512, True, "skewed", None),
]


def timed(fn, min_seconds: float = 0.3, max_iters: int = 200, rounds: int = 3) -> float:
    """Seconds per call: the best of ``rounds`` rounds' means (a shared machine's slow spells are
    left out rather than averaged in)."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        iters, start = 0, time.perf_counter()
        while iters < max_iters and (iters < 3 or time.perf_counter() - start < min_seconds):
            fn()
            iters += 1
        best = min(best, (time.perf_counter() - start) / iters)
    return best


def wrapper_for(cls, slots: torch.Tensor, num_slots: int, is_prefill: bool):
    from vllm.lora.layers import LoRAMapping

    wrapper = cls(max_num_batched_tokens=4096, max_batches=4096, device="cpu")
    ids = [i + 1 for i in range(num_slots)]
    index_mapping = tuple(0 if s < 0 else ids[s] for s in slots.tolist())
    wrapper.update_metadata(LoRAMapping(index_mapping, index_mapping, is_prefill=is_prefill), ids,
                            max_loras=num_slots, vocab_size=49152)
    return wrapper


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--num-adapters", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", type=Path, default=Path("bench-results/ops.json"))
    args = parser.parse_args(argv)

    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    from . import native, vllm_plugin
    from .cpu_wrapper import LoraplexPunicaWrapperCPU

    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    lora_a = tuple((torch.randn(args.num_adapters, 1, args.rank, HIDDEN, generator=g) * 0.05).to(dtype)
                   for _ in SLICES)
    lora_b = tuple((torch.randn(args.num_adapters, 1, w, args.rank, generator=g) * 0.05).to(dtype) for w in SLICES)
    rows = []
    for name, num_tokens, is_prefill, popularity, num_requests in CASES:
        slots = token_slots(num_tokens, args.num_adapters, popularity, seed=1, no_adapter_fraction=0.0,
                            num_requests=num_requests)
        x = torch.randn(num_tokens, HIDDEN, generator=g).to(dtype)
        out = torch.zeros(num_tokens, sum(SLICES), dtype=dtype)
        row = {"case": name, "tokens": num_tokens}
        for label, cls, compiled in (("vllm_us", PunicaWrapperCPU, False),
                                     ("loraplex_torch_us", LoraplexPunicaWrapperCPU, False),
                                     ("loraplex_us", LoraplexPunicaWrapperCPU, True)):
            vllm_plugin.select_lora_kernels("loraplex", compiled_ops_cache=native.environment_root() if compiled else None)
            wrapper = wrapper_for(cls, slots, args.num_adapters, is_prefill)
            row[label] = 1e6 * timed(lambda: wrapper.add_lora_linear(out, x, lora_a, lora_b, 1.0, SLICES))
        if num_tokens <= 64:
            row["reference_us"] = 1e6 * timed(
                lambda: reference.add_lora_linear(out, x, lora_a, lora_b, slots, 1.0, SLICES), max_iters=5, rounds=1)
        row["speedup_vs_vllm"] = row["vllm_us"] / row["loraplex_us"]
        rows.append(row)
        print(f"{name:>24}: vllm {row['vllm_us']:9.0f} us  loraplex torch ops {row['loraplex_torch_us']:8.0f} us  "
              f"loraplex {row['loraplex_us']:8.0f} us  "
              f"x{row['speedup_vs_vllm']:.1f}" + (f"  reference {row['reference_us']:9.0f} us"
                                                  if "reference_us" in row else ""), flush=True)
    result = {"rank": args.rank, "num_adapters": args.num_adapters, "dtype": args.dtype,
              "threads": torch.get_num_threads(), "cases": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
