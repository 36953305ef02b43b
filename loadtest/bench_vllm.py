"""End-to-end benchmark: the same multi-adapter workload through vLLM with its stock LoRA ops
(``--lora-kernels vllm``), with loraplex's ops (``loraplex``; ``loraplex-torch``: without the
compiled op for small steps; ``loraplex-bf16``: with the adapters stored in bfloat16, as
``--lora-dtype bfloat16`` serves them under a float32 model), and the base model without LoRA.

Each configuration runs in its own process (a fresh engine), one after the other, in one run.
Saturated load: every request is submitted at once. Also checks that greedy tokens agree
between the two kernel choices. Prints a table and writes JSON.

    python -m loraplex.loadtest.bench_vllm --out bench-results/e2e.json
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

CONFIGS = ("base", "loraplex", "vllm")  # base and ours side by side in time


def make_prompts(num_requests: int, prompt_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(100, vocab_size) for _ in range(prompt_len)] for _ in range(num_requests)]


def run_config(config: str, args: dict, result_queue) -> None:
    """Child process: start one engine, run the workload, report numbers and greedy tokens."""
    from loraplex.kernels.vllm_plugin import select_lora_kernels
    from loraplex.server.adapters.registry import AdapterRegistry
    from loraplex.server.config import EngineConfig
    from loraplex.server.engine import Engine, SamplingOptions

    select_lora_kernels(select_kernels(config),
                        compiled_ops_cache=Path(args["cache_dir"]) if config in ("loraplex", "loraplex-bf16") else None)
    engine_config = EngineConfig(
        model_path=args["model_dir"], dtype=args["dtype"], kv_cache_gib=args["kv_cache_gib"],
        max_model_len=1024, max_num_seqs=args["max_num_seqs"], max_num_batched_tokens=args["max_num_batched_tokens"],
        enable_lora=config != "base", max_loras=args["max_loras"], max_lora_rank=args["rank"],
        max_cpu_loras=max(args["max_loras"], len(args["adapters"])), lora_kernels=select_kernels(config),
        lora_dtype="bfloat16" if config == "loraplex-bf16" else "auto",
        lora_target_modules=tuple(args["lora_target_modules"]) if args["lora_target_modules"] else None)

    async def main():
        engine = Engine.start(engine_config)
        registry = AdapterRegistry("base")
        adapters = []
        if config != "base":
            for path in args["adapters"]:
                entry = registry.register_in_place(Path(path).name, Path(path))  # the benchmark's own files
                await engine.add_adapter(entry)
                adapters.append(entry)
        options = SamplingOptions(max_tokens=args["output_len"], temperature=0.0)

        async def one(i: int, prompt: list[int]):
            adapter = adapters[i % len(adapters)] if adapters else None
            start = time.perf_counter()
            first = None
            tokens: list[int] = []
            async for chunk in engine.generate(prompt, SamplingOptions(max_tokens=options.max_tokens,
                                                                       temperature=0.0, stream=True),
                                               f"{config}-{i}", adapter):
                if first is None and chunk.token_ids:
                    first = time.perf_counter()
                tokens.extend(chunk.token_ids)
            end = time.perf_counter()
            return tokens, first - start, end - start

        # Warm-up (adapters loaded into slots, allocator warmed), not measured.
        await asyncio.gather(*[one(i, p) for i, p in enumerate(args["prompts"][: args["max_loras"]])])
        start = time.perf_counter()
        results = await asyncio.gather(*[one(i, p) for i, p in enumerate(args["prompts"])])
        elapsed = time.perf_counter() - start
        engine.shutdown()
        return results, elapsed

    results, elapsed = asyncio.run(main())
    gc.collect()  # the engine client's finaliser runs now, not during interpreter shutdown
    num_output = sum(len(tokens) for tokens, _, _ in results)
    num_prompt = sum(len(p) for p in args["prompts"])
    ttft = sorted(r[1] for r in results)
    e2e = sorted(r[2] for r in results)
    result_queue.put({
        "config": config,
        "duration_s": elapsed,
        "completed": len(results),
        "request_throughput": len(results) / elapsed,
        "output_throughput": num_output / elapsed,
        "total_token_throughput": (num_output + num_prompt) / elapsed,
        "mean_ttft_ms": 1000 * statistics.mean(ttft),
        "p99_ttft_ms": 1000 * ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))],
        "mean_e2e_ms": 1000 * statistics.mean(e2e),
        "greedy_tokens": [tokens for tokens, _, _ in results],
    })


def select_kernels(config: str) -> str:
    return "loraplex" if config.startswith("loraplex") else "vllm"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="base model dir (default: embedded SmolLM2)")
    parser.add_argument("--num-adapters", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--max-loras", type=int, default=16)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=4096)
    parser.add_argument("--kv-cache-gib", type=float, default=2.0)
    parser.add_argument("--dtype", default="auto", help="auto: as `loraplex serve` picks it")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--repeats", type=int, default=1,
                        help="run the configurations this many times, alternating; report each one's median")
    parser.add_argument("--lora-target-modules", default=None,
                        help="comma-separated modules vLLM wraps with LoRA (default: all supported)")
    parser.add_argument("--out", type=Path, default=Path("bench-results/e2e.json"))
    args = parser.parse_args(argv)

    from loraplex.server import default_model
    from loraplex.server.engine import resolve_dtype

    args.dtype = resolve_dtype(args.dtype)
    cache_dir = default_model.default_cache_dir()
    model_dir = args.model or default_model.ensure_default_model(cache_dir)
    from transformers import AutoConfig

    vocab_size = AutoConfig.from_pretrained(model_dir).vocab_size
    from loraplex.loadtest.adapters import make_adapters

    adapters = make_adapters(model_dir, cache_dir / "bench-adapters", args.num_adapters, args.rank, prefix="bench")
    shared = {
        "model_dir": str(model_dir), "cache_dir": str(cache_dir), "dtype": args.dtype, "kv_cache_gib": args.kv_cache_gib,
        "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
        "max_loras": args.max_loras, "rank": args.rank, "adapters": [str(p) for p in adapters],
        "output_len": args.output_len,
        "lora_target_modules": args.lora_target_modules.split(",") if args.lora_target_modules else None,
        "prompts": make_prompts(args.num_requests, args.prompt_len, vocab_size, seed=0),
    }
    ctx = mp.get_context("spawn")
    runs: dict[str, list[dict]] = {}
    for repeat in range(args.repeats):
        for config in args.configs.split(","):
            queue = ctx.Queue()
            process = ctx.Process(target=run_config, args=(config, shared, queue))
            process.start()
            run = queue.get()
            process.join()
            runs.setdefault(config, []).append(run)
            print(f"{config:>9} (run {repeat + 1}/{args.repeats}): {run['output_throughput']:8.1f} output tok/s  "
                  f"{run['request_throughput']:6.2f} req/s  mean TTFT {run['mean_ttft_ms']:8.1f} ms", flush=True)
    # Each configuration's median run by throughput; ratios are the median of each repeat's ratio
    # (the configurations alternate, so a slow spell of a shared machine lands on one repeat's
    # pair, not on one configuration).
    results = {config: sorted(config_runs, key=lambda r: r["output_throughput"])[len(config_runs) // 2]
               for config, config_runs in runs.items()}

    def median_ratio(numerator: str, denominator: str) -> float:
        return statistics.median(a["output_throughput"] / b["output_throughput"]
                                 for a, b in zip(runs[numerator], runs[denominator]))

    summary = {k: {m: v for m, v in r.items() if m != "greedy_tokens"} for k, r in results.items()}
    for config, config_runs in runs.items():
        summary[config]["output_throughput_of_each_run"] = [r["output_throughput"] for r in config_runs]
    if "base" in results:
        for config in ("vllm", "loraplex", "loraplex-torch", "loraplex-bf16"):
            if config in results:
                summary[config]["throughput_vs_base"] = median_ratio(config, "base")
    if "vllm" in results and "loraplex" in results:
        summary["loraplex"]["throughput_vs_stock_lora"] = median_ratio("loraplex", "vllm")
        same = sum(a == b for a, b in zip(results["vllm"]["greedy_tokens"], results["loraplex"]["greedy_tokens"]))
        summary["greedy_agreement"] = {"identical_requests": same, "requests": args.num_requests}
    if "loraplex" in results and "loraplex-bf16" in results:  # what rounding the adapters to bf16 changes
        same = sum(a == b for a, b in zip(results["loraplex"]["greedy_tokens"],
                                          results["loraplex-bf16"]["greedy_tokens"]))
        summary["loraplex-bf16"]["greedy_identical_to_loraplex"] = {"identical_requests": same,
                                                                    "requests": args.num_requests}
    summary["workload"] = {k: getattr(args, k) for k in ("num_adapters", "rank", "num_requests", "prompt_len",
                                                          "output_len", "max_loras", "dtype", "repeats")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
