"""Step-level microbenchmark of the compiled CPU op: one decode step's linear-LoRA calls on the
default model's widths (30 layers x q/k/v, o, gate/up, down), rank 16, each token on its own
adapter, with a base-model-sized read between calls, so the adapters' weights come from memory
as they do in a real step (the base model's weights flush the cache); and the same with the
weights left in cache. Prints milliseconds per step and the adapter bytes read per second, beside
the rate of the base-sized reads themselves (matrix-vector products, as a decode step's base
GEMMs read their weights): how near the op comes to what this core's memory gives.

With ``--runs``: prefill-shaped steps instead (one run of N tokens on one adapter, weights from
memory), the compiled op against the torch ops (``cpu_lora``) side by side: where the wrapper's
``COMPILED_MIN_TORCH_RUN`` should sit; with ``--variants``, each named build of the op this CPU
runs (``native.VARIANTS``) beside the others, in one process.

    python -m loraplex.kernels.bench_step_op --out bench-results/step-op.json
    python -m loraplex.kernels.bench_step_op --dtype float32 --weights-dtype bfloat16   # --lora-dtype bfloat16
    python -m loraplex.kernels.bench_step_op --runs 8,40,64,128,256 --threads 1 --out bench-results/step-op-runs.json
    python -m loraplex.kernels.bench_step_op --runs 4,8,40,128 --variants avx512bf16,avx2 --out bench-results/step-op-builds.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

# SmolLM2-135M: hidden 576, kv 192, intermediate 1536, 30 layers; (input width, output slices) per call.
LAYER_CALLS = ((576, (576, 192, 192)), (576, (576,)), (576, (1536, 1536)), (1536, (576,)))
NUM_LAYERS = 30
BASE_MODEL_ELEMENTS = 135_000_000


def step_weights(num_slots: int, rank: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    """Per call: (lora_a [S, R * slices, H], lora_b_t per slice [S, R, N_i]), as the wrapper passes them."""
    g = torch.Generator().manual_seed(0)
    calls = []
    for _ in range(NUM_LAYERS):
        for hidden, widths in LAYER_CALLS:
            lora_a = (torch.randn(num_slots, rank * len(widths), hidden, generator=g) * 0.05).to(dtype)
            lora_b_t = [(torch.randn(num_slots, rank, w, generator=g) * 0.05).to(dtype) for w in widths]
            calls.append((lora_a, lora_b_t))
    return calls


def base_model_reads(num_calls: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """What a base model's step reads, one chunk per call (read with a matrix-vector product
    before each call, so the adapters' weights come from memory)."""
    chunk = BASE_MODEL_ELEMENTS // num_calls
    return torch.randn(num_calls, chunk // 1000, 1000).to(dtype), torch.randn(1000).to(dtype)


def step_buffers(num_tokens: int, dtype: torch.dtype) -> tuple[dict[int, torch.Tensor], list[torch.Tensor]]:
    """Inputs per input width and outputs per call kind for ``num_tokens`` tokens."""
    inputs = {h: torch.randn(num_tokens, h).to(dtype) for h, _ in LAYER_CALLS}
    return inputs, [torch.zeros(num_tokens, sum(widths), dtype=dtype) for _, widths in LAYER_CALLS]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="1,2,8", help="decode tokens per step, each on its own adapter")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--weights-dtype", default=None,
                        help="the adapters' dtype when not --dtype's (a float32 model with --lora-dtype "
                             "bfloat16; steps only, not --runs)")
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--runs", help="prefill runs to time instead, e.g. 8,40,64,128,256 (tokens on one adapter)")
    parser.add_argument("--variants", help="with --runs: builds of the op to time side by side, e.g. avx512bf16,avx2 "
                        "(default: the best this CPU runs)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (vLLM's CPU worker: 1 when serving)")
    parser.add_argument("--out", type=Path, default=Path("bench-results/step-op.json"))
    args = parser.parse_args(argv)
    token_counts = [int(n) for n in args.tokens.split(",")]
    if not token_counts or min(token_counts) < 1 or args.repeats < 1:
        parser.error("--tokens and --repeats must be at least 1")

    from . import native

    op = native.load(native.environment_root())
    if op is None:
        print("the compiled op is not available on this machine", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if args.runs:
        ops = {"compiled": op}
        if args.variants:
            ops = {name: native.load(native.environment_root(), variant=name) for name in args.variants.split(",")}
            missing = [name for name, variant_op in ops.items() if variant_op is None]
            if missing:
                print(f"builds not available on this CPU: {', '.join(missing)} (it runs {native.host_variants()})",
                      file=sys.stderr)
                return 1
        return compare_runs(ops, [int(n) for n in args.runs.split(",")], args, dtype)
    num_slots = max(token_counts)
    calls = step_weights(num_slots, args.rank, getattr(torch, args.weights_dtype or args.dtype))
    layers = [op.Layer(lora_a, lora_b_t) for lora_a, lora_b_t in calls]  # as the wrapper holds them
    base, vector = base_model_reads(len(calls), dtype)
    rows = []
    for num_tokens in token_counts:
        slots = torch.arange(num_tokens, dtype=torch.long)
        inputs, outputs = step_buffers(num_tokens, dtype)
        adapter_bytes = sum((a[0].numel() + sum(b[0].numel() for b in bt)) * a.element_size()
                            for a, bt in calls) * num_tokens
        seconds: dict[str, list[float]] = {"from_memory": [], "in_cache": []}
        base_seconds = []
        for _ in range(args.repeats):
            for mode in seconds:
                spent = base_spent = 0.0
                for i, layer in enumerate(layers):
                    if mode == "from_memory":
                        start = time.perf_counter()
                        torch.mv(base[i], vector)
                        base_spent += time.perf_counter() - start
                    hidden, _ = LAYER_CALLS[i % len(LAYER_CALLS)]
                    start = time.perf_counter()
                    op.add_lora_linear_layer(outputs[i % len(LAYER_CALLS)], inputs[hidden], slots, layer, 2.0, 0)
                    spent += time.perf_counter() - start
                seconds[mode].append(spent)
                if mode == "from_memory":
                    base_seconds.append(base_spent)
        row = {"tokens": num_tokens, "adapter_mb_per_step": adapter_bytes / 1e6,
               "base_reads_gb_per_s": base.numel() * base.element_size() / statistics.median(base_seconds) / 1e9}
        for mode, runs in seconds.items():
            row[f"{mode}_ms"] = 1e3 * statistics.median(runs)
            row[f"{mode}_gb_per_s"] = adapter_bytes / statistics.median(runs) / 1e9
        row["from_memory_vs_base_reads"] = row["from_memory_gb_per_s"] / row["base_reads_gb_per_s"]
        rows.append(row)
        print(f"{num_tokens:3d} tokens ({row['adapter_mb_per_step']:.1f} MB of adapters): from memory "
              f"{row['from_memory_ms']:.2f} ms ({row['from_memory_gb_per_s']:.1f} GB/s, "
              f"{row['from_memory_vs_base_reads']:.0%} of the base reads' {row['base_reads_gb_per_s']:.1f} GB/s), "
              f"in cache {row['in_cache_ms']:.2f} ms ({row['in_cache_gb_per_s']:.1f} GB/s)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rank": args.rank, "dtype": args.dtype,
                                    "weights_dtype": args.weights_dtype or args.dtype, "calls_per_step": len(calls),
                                    "steps": rows}, indent=2))
    return 0


def compare_runs(ops: dict, run_lengths: list[int], args, dtype: torch.dtype) -> int:
    """Prefill-shaped steps: ``run_length`` tokens on slot 0, through each compiled op (``ops``:
    name -> module) and through the torch ops, alternated, each call after a base-model-sized read."""
    from . import cpu_lora

    calls = step_weights(1, args.rank, dtype)
    torch_calls = [([lora_a[:, args.rank * i:args.rank * (i + 1)] for i in range(len(lora_b_t))],
                    [b.transpose(1, 2).contiguous() for b in lora_b_t]) for lora_a, lora_b_t in calls]
    layers = {name: [op.Layer(lora_a, lora_b_t) for lora_a, lora_b_t in calls] for name, op in ops.items()}
    base, vector = base_model_reads(len(calls), dtype)
    rows = []
    for run_length in run_lengths:
        slots = torch.zeros(run_length, dtype=torch.long)
        plan, workspace = cpu_lora.build_plan(slots, min_direct_run=1), cpu_lora.Workspace()
        inputs, outputs = step_buffers(run_length, dtype)
        seconds: dict[str, list[float]] = {**{name: [] for name in ops}, "torch": []}
        for _ in range(args.repeats):
            for side in seconds:
                spent = 0.0
                for i, (lora_a, _) in enumerate(calls):
                    torch.mv(base[i], vector)
                    hidden, widths = LAYER_CALLS[i % len(LAYER_CALLS)]
                    out = outputs[i % len(LAYER_CALLS)]
                    start = time.perf_counter()
                    if side in ops:
                        ops[side].add_lora_linear_layer(out, inputs[hidden], slots, layers[side][i], 2.0, 0)
                    else:
                        cpu_lora.add_lora_linear(plan, out, inputs[hidden], torch_calls[i][0], torch_calls[i][1], 2.0,
                                                 widths, workspace=workspace, fused_lora_a=lora_a)
                    spent += time.perf_counter() - start
                seconds[side].append(spent)
        row = {"run_tokens": run_length, **{f"{side}_ms": 1e3 * statistics.median(v) for side, v in seconds.items()}}
        rows.append(row)
        timings = ", ".join(f"{'torch ops' if side == 'torch' else side} {row[f'{side}_ms']:.2f} ms" for side in seconds)
        print(f"{run_length:4d} tokens on one adapter: {timings}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rank": args.rank, "dtype": args.dtype, "threads": args.threads,
                                    "calls_per_step": len(calls), "runs": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
