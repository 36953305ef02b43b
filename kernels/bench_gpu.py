"""GPU benchmark of the Triton ops on an 8B model's shapes (Llama-3-8B: hidden 4096, q/k/v
4096/1024/1024, gate/up 14336): achieved memory bandwidth vs the device's peak, ranks 8-64,
1-128 adapters. Needs CUDA; prints a table and writes JSON.

    python -m loraplex.kernels.bench_gpu --out bench-results/gpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from . import triton_lora
from .workloads import token_slots

HIDDEN = 4096
PROJECTIONS = {"qkv": (4096, 1024, 1024), "gate_up": (14336, 14336)}
PEAK_BANDWIDTH_GBS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0}


def peak_bandwidth(name: str) -> float | None:
    for key, value in PEAK_BANDWIDTH_GBS.items():
        if key in name:
            return value
    return None


def bytes_moved(num_tokens: int, num_active: int, rank: int, widths: tuple[int, ...], elem: int) -> int:
    """Weights of the active adapters once, activations in, LoRA output read+written."""
    weights = num_active * rank * (HIDDEN * len(widths) + sum(widths)) * elem
    activations = num_tokens * HIDDEN * elem + 2 * num_tokens * sum(widths) * elem
    intermediate = 2 * len(widths) * num_tokens * rank * 4
    return weights + activations + intermediate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-results/gpu.json"))
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 128, 512])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu needs CUDA", file=sys.stderr)
        return 2
    import triton

    device_name = torch.cuda.get_device_name()
    peak = peak_bandwidth(device_name)
    dtype = torch.bfloat16
    rows = []
    for projection, widths in PROJECTIONS.items():
        for rank in (8, 16, 32, 64):
            for num_adapters in (1, 8, 32, 128):
                for num_tokens in args.tokens:
                    slots = token_slots(num_tokens, num_adapters, "uniform", no_adapter_fraction=0.0).cuda()
                    lora_a = [torch.randn(num_adapters, rank, HIDDEN, device="cuda", dtype=dtype) * 0.01
                              for _ in widths]
                    lora_b = [torch.randn(num_adapters, w, rank, device="cuda", dtype=dtype) * 0.01 for w in widths]
                    x = torch.randn(num_tokens, HIDDEN, device="cuda", dtype=dtype)
                    out = torch.zeros(num_tokens, sum(widths), device="cuda", dtype=dtype)
                    meta = triton_lora.build_meta(slots)
                    ms = triton.testing.do_bench(
                        lambda: triton_lora.add_lora_linear(meta, out, x, lora_a, lora_b, 1.0, widths))
                    moved = bytes_moved(num_tokens, meta.num_segments, rank, widths, 2)
                    gbs = moved / (ms * 1e-3) / 1e9
                    row = {"projection": projection, "rank": rank, "adapters": num_adapters, "tokens": num_tokens,
                           "active_adapters": meta.num_segments, "us": ms * 1e3, "GB_per_s": gbs,
                           "fraction_of_peak": gbs / peak if peak else None}
                    rows.append(row)
                    share = f"  {100 * gbs / peak:5.1f}% of peak" if peak else ""
                    print(f"{projection:>8} r{rank:<3} adapters {num_adapters:>3} tokens {num_tokens:>4}: "
                          f"{row['us']:8.1f} us  {gbs:7.0f} GB/s{share}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": device_name, "peak_GB_per_s": peak, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
