"""Decode-step profile: what LoRA adds to one engine step with 1, 2, 8 and 32 sequences, each on
its own adapter, against the same sequences without one, on one in-process vLLM engine (and
what it adds to their prefill: ``--prompt-len`` tokens each, plus the first step).

Three kinds of step, alternated within one engine (a shared machine's slow spells spread over
all three): ``base`` (no adapter), ``torch`` (loraplex's grouped torch ops), ``compiled``
(loraplex's compiled op for small steps). The LoRA share of each step is timed where it runs:
the punica wrapper's per-step metadata and its per-layer calls.

    python -m loraplex.loadtest.decode_step --out bench-results/decode-step.json
    python -m loraplex.loadtest.decode_step --targets q_proj,v_proj   # adapters on PEFT's Llama default
    python -m loraplex.loadtest.decode_step --lora-dtype bfloat16      # adapters stored in bf16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

from loraplex.server.config import LORA_DTYPE_CHOICES

from .adapters import ALL_TARGETS

KINDS = ("base", "torch", "compiled")
TIMED_METHODS = ("update_metadata", "add_lora_linear", "add_lora_logits", "add_lora_embedding")


class WrapperTimer:
    """Seconds spent in the punica wrapper's methods, per method (patched on the class), and the
    wrappers the engine made."""

    def __init__(self, cls) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.instances = []
        for name in TIMED_METHODS:
            setattr(cls, name, self._timed(name, getattr(cls, name)))
        original_init = cls.__init__

        def init(wrapper, *args, **kwargs):
            original_init(wrapper, *args, **kwargs)
            self.instances.append(wrapper)
        cls.__init__ = init

    def _timed(self, name, method):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start
        return timed

    def take(self) -> dict[str, float]:
        taken = dict(self.seconds)
        self.seconds.clear()
        return taken


def compute_threads(reserved_cores: int) -> int:
    """The compute threads a server's engine worker runs with on this machine: its usable cores
    less those kept for the doors and the scheduler (at least one)."""
    return max(1, len(os.sched_getaffinity(0)) - reserved_cores)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="base model dir (default: embedded SmolLM2)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", default=",".join(ALL_TARGETS),
                        help="modules the adapters target (e.g. q_proj,v_proj: PEFT's default for Llama)")
    parser.add_argument("--sequences", default="1,2,8,32")
    parser.add_argument("--steps", type=int, default=32, help="decode steps measured per run")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="auto", help="auto: as `loraplex serve` picks it")
    parser.add_argument("--lora-dtype", default="auto", choices=LORA_DTYPE_CHOICES,
                        help="the dtype adapters are stored in (`loraplex serve --lora-dtype`)")
    parser.add_argument("--reserved-cores", type=int, default=0,
                        help="cores kept free of the engine's compute threads (a server keeps 1 for its doors)")
    parser.add_argument("--out", type=Path, default=Path("bench-results/decode-step.json"))
    args = parser.parse_args(argv)
    sequences = [int(n) for n in args.sequences.split(",")]

    from loraplex.kernels.vllm_plugin import select_lora_kernels
    from loraplex.loadtest.adapters import make_adapters
    from loraplex.server import default_model
    from loraplex.server.engine import resolve_dtype

    cache_dir = default_model.default_cache_dir()
    model_dir = args.model or default_model.ensure_default_model(cache_dir)
    adapters = make_adapters(model_dir, cache_dir / "bench-adapters", max(sequences), args.rank, prefix="bench",
                             targets=tuple(args.targets.split(",")))
    # The engine core and its worker in this process, so the wrapper is reachable and timed here.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(args.reserved_cores)
    # In one process vLLM binds no threads (a server's worker gets OMP_NUM_THREADS = its cores), and
    # it refuses torch.set_num_threads once the engine is up: set the server's count before that.
    import torch

    threads = compute_threads(args.reserved_cores)
    torch.set_num_threads(threads)
    select_lora_kernels("loraplex", compiled_ops_cache=cache_dir)
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from loraplex.kernels.cpu_wrapper import LoraplexPunicaWrapperCPU

    timer = WrapperTimer(LoraplexPunicaWrapperCPU)
    llm = LLM(model=str(model_dir), dtype=resolve_dtype(args.dtype), enable_lora=True, max_loras=max(sequences),
              max_lora_rank=args.rank, max_cpu_loras=max(sequences), lora_dtype=args.lora_dtype, max_model_len=512,
              kv_cache_memory_bytes=1 << 30, enforce_eager=True, seed=0)
    wrappers = timer.instances
    compiled = wrappers[0]._compiled
    if compiled is None:
        print("the compiled op is not available on this machine: 'compiled' runs the torch ops", file=sys.stderr)
    loras = [LoRARequest(f"bench-{i}", i + 1, str(path)) for i, path in enumerate(adapters)]
    prompt = {"prompt_token_ids": list(range(1000, 1000 + args.prompt_len))}

    def run(kind: str, num_sequences: int, max_tokens: int) -> tuple[float, dict[str, float]]:
        for wrapper in wrappers:
            wrapper._compiled = compiled if kind == "compiled" else None
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        lora = None if kind == "base" else loras[:num_sequences]
        timer.take()
        start = time.perf_counter()
        llm.generate([prompt] * num_sequences, params, lora_request=lora, use_tqdm=False)
        return time.perf_counter() - start, timer.take()

    rows = []
    for num_sequences in sequences:
        for kind in KINDS:
            run(kind, num_sequences, 4)  # warm: adapters in their slots, buffers sized
        samples: dict[str, list[dict]] = defaultdict(list)
        for _ in range(args.repeats):
            for kind in KINDS:
                # A decode step = (prefill + N steps) - (prefill alone), over N steps.
                full, spent_full = run(kind, num_sequences, args.steps + 1)
                prefill, spent_prefill = run(kind, num_sequences, 1)
                per_step = {name: 1000 * (spent_full.get(name, 0.0) - spent_prefill.get(name, 0.0)) / args.steps
                            for name in TIMED_METHODS}
                samples[kind].append({"step_ms": 1000 * (full - prefill) / args.steps, "prefill_ms": 1000 * prefill,
                                      **per_step})
        row = {"sequences": num_sequences}
        for kind, runs in samples.items():
            median = statistics.median(r["step_ms"] for r in runs)
            row[kind] = {"step_ms": median, "step_ms_of_each_run": [r["step_ms"] for r in runs],
                         "prefill_ms": statistics.median(r["prefill_ms"] for r in runs),
                         **{f"{name}_ms": statistics.median(r[name] for r in runs) for name in TIMED_METHODS}}
        for kind in ("torch", "compiled"):
            row[kind]["vs_base"] = row[kind]["step_ms"] / row["base"]["step_ms"]
            row[kind]["prefill_vs_base"] = row[kind]["prefill_ms"] / row["base"]["prefill_ms"]
        rows.append(row)
        print(f"{num_sequences:3d} sequences: base {row['base']['step_ms']:6.1f} ms | torch ops "
              f"{row['torch']['step_ms']:6.1f} ms ({row['torch']['vs_base']:.2f}x; linear LoRA "
              f"{row['torch']['add_lora_linear_ms']:5.1f}, metadata {row['torch']['update_metadata_ms']:4.1f}) | "
              f"compiled {row['compiled']['step_ms']:6.1f} ms ({row['compiled']['vs_base']:.2f}x; linear LoRA "
              f"{row['compiled']['add_lora_linear_ms']:5.1f}, metadata {row['compiled']['update_metadata_ms']:4.1f})"
              f" | prefill + 1 step: base {row['base']['prefill_ms']:6.1f},"
              f" torch ops {row['torch']['prefill_ms']:6.1f},"
              f" compiled {row['compiled']['prefill_ms']:6.1f} ms", flush=True)
    result = {"rank": args.rank, "targets": args.targets.split(","), "steps": args.steps,
              "prompt_len": args.prompt_len, "repeats": args.repeats, "dtype": resolve_dtype(args.dtype),
              "lora_dtype": args.lora_dtype,
              "reserved_cores": args.reserved_cores, "compute_threads": threads,
              "compiled_available": compiled is not None, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
