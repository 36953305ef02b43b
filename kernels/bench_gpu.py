"""GPU benchmark, one process, same inputs: our Triton ops (eager and CUDA-graph replay) against
vLLM's Triton LoRA ops (``lora_shrink`` + ``lora_expand`` from ``vllm/lora/ops/triton_ops/``) and
the pure-torch reference, on Llama-3-8B shapes (q/k/v 4096 -> 4096/1024/1024, gate/up 4096 ->
14336 x 2, down 14336 -> 4096), ranks 8/16/64, 1-128 distinct adapters, decode (1 token per
request, 1-256 requests) and prefill (512-8192 tokens). Prints microseconds, achieved GB/s, % of
the device's HBM peak and the ratio to vLLM's op; writes JSON.

The GPU machines have torch and triton but no vLLM: stage vLLM's op files (and the few shims
they import) next to a copy of our kernels on a machine that has vLLM, carry that folder over,
and run from it:

    python -m loraplex.kernels.bench_gpu --stage .cache/gpu-bench            # here (vLLM installed)
    PYTHONPATH=.cache/gpu-bench python -m loraplex.kernels.bench_gpu --out bench-results/gpu.json

``--smoke`` runs a few tiny cases (on CPU: under TRITON_INTERPRET=1) and checks all three agree.
``--tune`` times candidate tile configs per op and rank bucket on this GPU and writes its table
(``--out``, the format of ``kernels/tile_configs.json``, to merge there under the device's name).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from .workloads import token_slots

PROJECTIONS = {"qkv": (4096, (4096, 1024, 1024)), "gate_up": (4096, (14336, 14336)), "down": (14336, (4096,))}
RANKS = (8, 16, 64)
DECODE_REQUESTS = (1, 4, 16, 64, 256)
PREFILL_TOKENS = (512, 2048, 8192)
ADAPTERS = (1, 8, 32, 128)
PEAK_BANDWIDTH_GBS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0}

# vLLM's files the benchmark runs (copied as they are) and the shims standing in for the rest of vLLM.
VLLM_OP_FILES = ("kernel_utils.py", "lora_shrink_op.py", "lora_expand_op.py", "lora_kernel_metadata.py", "utils.py")
VLLM_SHIMS = {
    "vllm/__init__.py": "",
    "vllm/envs.py": ("VLLM_BATCH_INVARIANT = False\nVLLM_TUNED_CONFIG_FOLDER = None\n"
                     "VLLM_LORA_DISABLE_PDL = True\nVLLM_LORA_ENABLE_DUAL_STREAM = False\n"),
    "vllm/logger.py": ("import logging\n\n\nclass _Logger(logging.LoggerAdapter):\n"
                       "    def warning_once(self, msg, *a, **k):\n        self.warning(msg, *a)\n\n"
                       "    def info_once(self, msg, *a, **k):\n        self.info(msg, *a)\n\n\n"
                       "def init_logger(name):\n    return _Logger(logging.getLogger(name), {})\n"),
    "vllm/platforms/__init__.py": ("import torch\n\n\nclass _Platform:\n"
                                   "    def is_cuda(self):\n        return torch.cuda.is_available()\n\n"
                                   "    def has_device_capability(self, capability):\n"
                                   "        if not torch.cuda.is_available():\n            return False\n"
                                   "        major, minor = torch.cuda.get_device_capability()\n"
                                   "        return major * 10 + minor >= capability\n\n"
                                   "    def get_device_name(self):\n"
                                   "        return torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'\n\n\n"
                                   "current_platform = _Platform()\n"),
    "vllm/utils/__init__.py": "",
    "vllm/utils/math_utils.py": "def next_power_of_2(n):\n    return 1 << max(0, int(n) - 1).bit_length()\n",
    "vllm/utils/torch_utils.py": ("import torch\n\n\ndef async_tensor_h2d(data, device=None, dtype=None, out=None):\n"
                                  "    return torch.tensor(data, dtype=dtype, device=device)\n\n\n"
                                  "def direct_register_custom_op(*args, **kwargs):\n"
                                  "    raise AttributeError('not registered: called directly')\n"),
    "vllm/triton_utils/__init__.py": "import triton\nimport triton.language as tl\n\nHAS_TRITON = True\n",
    "vllm/lora/__init__.py": "",
    "vllm/lora/ops/__init__.py": "",
    "vllm/lora/ops/triton_ops/__init__.py": (
        "from .lora_expand_op import lora_expand\nfrom .lora_kernel_metadata import LoRAKernelMeta\n"
        "from .lora_shrink_op import lora_shrink\n"),
}


STAGE_MARKER = ".loraplex-gpu-bench"


def stage(dest: Path) -> None:
    """Copy vLLM's LoRA op files (from the installed vLLM), their shims, and our kernels into
    ``dest``, importable from there as ``vllm`` and ``loraplex.kernels``."""
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("--stage needs vLLM installed (it copies vLLM's op files)")
    ops_dir = Path(next(iter(spec.submodule_search_locations))) / "lora" / "ops" / "triton_ops"
    if dest.exists():  # only a folder this function staged is replaced: never a mistyped path's contents
        if not (dest / STAGE_MARKER).is_file():
            raise SystemExit(f"--stage {dest}: exists and is not a staged benchmark folder; choose a new path")
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    (dest / STAGE_MARKER).write_text("staged by python -m loraplex.kernels.bench_gpu --stage\n")
    for relative, text in VLLM_SHIMS.items():
        (dest / relative).parent.mkdir(parents=True, exist_ok=True)
        (dest / relative).write_text(text)
    for name in VLLM_OP_FILES:
        shutil.copy2(ops_dir / name, dest / "vllm" / "lora" / "ops" / "triton_ops" / name)
    kernels = Path(__file__).parent
    (dest / "loraplex").mkdir()
    (dest / "loraplex" / "__init__.py").write_text("")
    shutil.copytree(kernels, dest / "loraplex" / "kernels", ignore=shutil.ignore_patterns("__pycache__", "csrc"))
    print(f"staged vLLM's LoRA ops ({', '.join(VLLM_OP_FILES)}) and loraplex.kernels in {dest}")


def peak_bandwidth(name: str) -> float | None:
    for key, value in PEAK_BANDWIDTH_GBS.items():
        if key in name:
            return value
    return None


def bytes_moved(num_tokens: int, num_active: int, rank: int, hidden: int, widths: tuple[int, ...],
                elem: int) -> int:
    """The active adapters' weights once, the activations in, the output read and written, and
    the float32 shrink result written and read."""
    weights = num_active * rank * (hidden * len(widths) + sum(widths)) * elem
    activations = num_tokens * hidden * elem + 2 * num_tokens * sum(widths) * elem
    intermediate = 2 * len(widths) * num_tokens * rank * 4
    return weights + activations + intermediate


class VllmOps:
    """vLLM's shrink + expand for one multi-slice layer, with its own per-step metadata."""

    def __init__(self, max_loras: int, max_tokens: int, device) -> None:
        from vllm.lora.ops.triton_ops import LoRAKernelMeta, lora_expand, lora_shrink

        self._shrink, self._expand = lora_shrink, lora_expand
        self.meta = LoRAKernelMeta.make(max_loras, max_tokens, device=device)

    def prepare(self, slots: torch.Tensor) -> None:
        self.meta.prepare_tensors(slots)

    def __call__(self, out, x, lora_a, lora_b, widths, buffer) -> None:
        args = self.meta.meta_args(x.shape[0], False)
        self._shrink(x, lora_a, buffer, *args, 1.0)
        self._expand(buffer, lora_b, out, *args, offset_start=0, add_inputs=True)


def timed_us(fn, device) -> float:
    if device == "cuda":
        import triton

        return 1e3 * triton.testing.do_bench(fn, warmup=10, rep=50)
    fn()
    start = time.perf_counter()
    fn()
    return 1e6 * (time.perf_counter() - start)


def run_case(projection, rank, num_adapters, num_tokens, requests, dtype, device, peak, check: bool,
             timer=None) -> dict:
    from . import reference, triton_lora

    hidden, widths = PROJECTIONS[projection]
    slots = token_slots(num_tokens, num_adapters, "distinct", no_adapter_fraction=0.0,
                        num_requests=requests, seed=rank + num_tokens).to(device)
    g = torch.Generator(device=device).manual_seed(0)
    lora_a = [torch.randn(num_adapters, 1, rank, hidden, device=device, dtype=dtype, generator=g) * 0.02
              for _ in widths]
    lora_b = [torch.randn(num_adapters, 1, w, rank, device=device, dtype=dtype, generator=g) * 0.02 for w in widths]
    x = torch.randn(num_tokens, hidden, device=device, dtype=dtype, generator=g)
    base = torch.randn(num_tokens, sum(widths), device=device, dtype=dtype, generator=g)
    out = base.clone()
    split_k = triton_lora.max_split_k(rank, triton_lora.device_name(device))
    buffers = triton_lora.MetaBuffers(num_adapters, num_tokens, device)
    shrink_out = torch.empty(len(widths), num_tokens, rank, dtype=torch.float32, device=device)
    partials = torch.empty(split_k, len(widths), num_tokens, rank, dtype=torch.float32, device=device)
    meta = buffers.fill(slots)

    def ours():
        triton_lora.add_lora_linear(meta, out, x, lora_a, lora_b, 1.0, widths, buffer=shrink_out, partials=partials)

    if timer is not None:  # tuning: ours only
        return {"ours_us": timer(ours)}
    vllm_ops = VllmOps(num_adapters, num_tokens, device)
    vllm_ops.prepare(slots)
    vllm_buffer = torch.empty(len(widths), num_tokens, rank, dtype=torch.float32, device=device)

    def theirs():
        vllm_ops(out, x, tuple(lora_a), tuple(lora_b), widths, vllm_buffer)

    row = {"projection": projection, "rank": rank, "adapters": num_adapters, "tokens": num_tokens,
           "requests": requests, "kind": "decode" if requests == num_tokens else "prefill"}
    if check:
        expected = reference.add_lora_linear(base.float().cpu(), x.float().cpu(), [a.float().cpu() for a in lora_a],
                                             [b.float().cpu() for b in lora_b], slots.cpu(), 1.0, widths)
        for label, fn in (("ours", ours), ("vllm", theirs)):
            out.copy_(base)
            fn()
            row[f"{label}_max_error"] = float((out.float().cpu() - expected).abs().max())
    row["ours_us"] = timed_us(ours, device)
    row["vllm_us"] = timed_us(theirs, device)
    if device == "cuda":
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            ours()
        row["ours_graph_us"] = timed_us(graph.replay, device)
        out.copy_(base)
        ours()
        eager = out.clone()
        out.copy_(base)
        graph.replay()
        row["graph_bit_identical"] = bool(torch.equal(eager, out))
    moved = bytes_moved(num_tokens, min(num_adapters, requests), rank, hidden, widths, x.element_size())
    row["adapter_bytes"] = min(num_adapters, requests) * rank * (hidden * len(widths) + sum(widths)) * x.element_size()
    row["ours_GB_per_s"] = moved / (row["ours_us"] * 1e-6) / 1e9
    row["ours_fraction_of_peak"] = row["ours_GB_per_s"] / peak if peak else None
    row["speedup_vs_vllm"] = row["vllm_us"] / row["ours_us"]
    return row


TUNE_CANDIDATES = {
    "shrink": [{"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "SPLIT_K": split}
               for m in (16, 32, 64) for n in (16, 32, 64) for k in (32, 64, 128) for split in (1, 2, 4, 8)],
    "expand": [{"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k} for m in (16, 32, 64) for n in (32, 64, 128)
               for k in (16, 32, 64)],
}
TUNE_RANK_BOUNDS = ((16, 16), (64, 64), (None, 128))  # (table bound, rank timed for it)
TUNE_WORKLOADS = (("qkv", 32, 64, 64), ("qkv", 8, 2048, 8), ("gate_up", 32, 64, 64))  # projection, adapters, tokens, requests


def tune(device: str, device_label: str, dtype) -> dict:
    """The fastest candidate per op and rank bucket over TUNE_WORKLOADS (sum of their times)."""
    import triton

    from . import triton_lora

    tables = triton_lora.tile_tables()
    table: dict[str, list] = {"shrink": [], "expand": []}
    for bound, rank in TUNE_RANK_BOUNDS:
        for op in ("shrink", "expand"):
            best = None
            for candidate in TUNE_CANDIDATES[op]:
                trial = {o: list(rows) for o, rows in tables[triton_lora.DEFAULT_DEVICE].items()}
                trial[op] = [(None, candidate)]
                tables[device_label] = trial
                try:
                    total = 0.0
                    for projection, adapters, tokens, requests in TUNE_WORKLOADS:
                        total += run_case(projection, rank, adapters, tokens, requests, dtype, device, None,
                                          check=False, timer=lambda fn: 1e3 * triton.testing.do_bench(fn))["ours_us"]
                except Exception:  # noqa: BLE001 - a config the compiler refuses (shared memory) is skipped
                    continue
                if best is None or total < best[0]:
                    best = (total, candidate)
            table[op].append([bound, best[1]])
            print(f"{op:>6} rank <= {bound}: {best[1]} ({best[0]:.1f} us over the workloads)", flush=True)
    tables.pop(device_label, None)
    return table


def cases(smoke: bool):
    if smoke:
        for projection in ("qkv", "down"):
            yield projection, 16, 4, 8, 8
            yield projection, 8, 2, 24, 2
        return
    for projection in PROJECTIONS:
        for rank in RANKS:
            for num_adapters in ADAPTERS:
                for requests in DECODE_REQUESTS:
                    if requests >= num_adapters or requests == DECODE_REQUESTS[-1]:
                        yield projection, rank, num_adapters, requests, requests
                for num_tokens in PREFILL_TOKENS:
                    yield projection, rank, num_adapters, num_tokens, max(num_adapters, num_tokens // 512)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", type=Path, default=None, help="copy vLLM's ops and our kernels here, then exit")
    parser.add_argument("--smoke", action="store_true", help="tiny cases, correctness only (CPU: interpreter)")
    parser.add_argument("--tune", action="store_true", help="tune this GPU's tile table; --out gets it")
    parser.add_argument("--out", type=Path, default=Path("bench-results/gpu.json"))
    args = parser.parse_args(argv)
    if args.stage is not None:
        stage(args.stage)
        return 0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        print("bench_gpu needs CUDA (on CPU only --smoke, under TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    if args.smoke:
        global PROJECTIONS
        PROJECTIONS = {"qkv": (64, (64, 32, 32)), "down": (96, (64,))}
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = peak_bandwidth(device_name)
    dtype = torch.bfloat16  # vLLM's ops take fp16/bf16 only
    if args.tune:
        if device != "cuda":
            print("--tune needs CUDA", file=sys.stderr)
            return 2
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({device_name: tune(device, device_name, dtype)}, indent=2))
        return 0
    rows = []
    for projection, rank, num_adapters, num_tokens, requests in cases(args.smoke):
        row = run_case(projection, rank, num_adapters, num_tokens, requests, dtype, device, peak, check=True)
        rows.append(row)
        share = f" {100 * row['ours_fraction_of_peak']:5.1f}% of peak" if peak else ""
        graph = f" graph {row['ours_graph_us']:8.1f} us" if "ours_graph_us" in row else ""
        print(f"{projection:>8} r{rank:<3} adapters {num_adapters:>3} {row['kind']:>7} tokens {num_tokens:>5}: "
              f"ours {row['ours_us']:8.1f} us{graph}  vllm {row['vllm_us']:8.1f} us  "
              f"x{row['speedup_vs_vllm']:.2f}{share}  err ours {row['ours_max_error']:.1e} vllm "
              f"{row['vllm_max_error']:.1e}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": device_name, "peak_GB_per_s": peak, "dtype": str(dtype),
                                    "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
