"""Evaluation benchmark: ``loraplex train``'s greedy evaluation of base and adapter on the serving
engine (vLLM in-process with loraplex's kernels, every prompt of both submitted at once; engine
start included, as the training report counts it) against what it ran before: HF transformers +
peft ``generate`` in left-padded batches (float32, the base model first, then the adapter).

Both sides run here, one after the other (``--repeats 2``: ABBA), on the same examples (the
demo's held-out set unless ``--eval FILE``), the same greedy decoding and token budget, the same
cores; it prints and writes each side's seconds, their ratio, and how many predictions the two
engines agree on (a check that they did the same work).

    python -m loraplex.loadtest.bench_eval --adapter ADAPTER_DIR --examples 200 --out bench-results/eval.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

MAX_LORA_RANK = 512  # the largest rank slot vLLM offers


def hf_generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy completions in left-padded batches: the evaluation's engine before the serving one."""
    import torch

    outputs: list[str] = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True,
                            padding_side="left", add_special_tokens=False)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                                 top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id)
            outputs.extend(tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return outputs


def run_hf(model_dir: Path, adapter_dir: Path, prompts: list[str], max_new_tokens: int,
           batch_size: int) -> tuple[float, dict[str, list[str]]]:
    import torch
    from peft import PeftModel

    from loraplex.server.training.model import load_base

    started = time.monotonic()
    model, tokenizer = load_base(model_dir, torch.device("cpu"))
    model.eval()
    base = hf_generate(model, tokenizer, prompts, max_new_tokens, batch_size)
    model = PeftModel.from_pretrained(model, adapter_dir).eval()
    adapter = hf_generate(model, tokenizer, prompts, max_new_tokens, batch_size)
    return time.monotonic() - started, {"base": base, "adapter": adapter}


def run_engine(model_dir: Path, adapter_dir: Path, adapter, token_ids: list[list[int]], max_new_tokens: int,
               max_length: int, cache_dir: Path) -> tuple[float, dict[str, list[str]], dict]:
    """``adapter``: the server's ``AdapterInfo`` of ``adapter_dir`` (rank, the modules its weights adapt)."""
    from loraplex.server.training import engine_eval

    started = time.monotonic()
    predictions, served = engine_eval.generate(engine_eval.EvalEngineConfig(
        model_dir=model_dir, adapter_dir=adapter_dir, rank=adapter.rank,
        target_modules=adapter.target_modules or None, max_new_tokens=max_new_tokens, max_model_len=max_length,
        compiled_ops_cache=cache_dir), token_ids, engine_eval.variants(compare_base=True, schema=None), None)
    return time.monotonic() - started, predictions, served


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", type=Path, required=True, help="a PEFT adapter directory of the default model")
    parser.add_argument("--eval", type=Path, help="held-out examples (training format; default: the demo's)")
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32, help="HF generate's batch")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=1, help="engine/HF pairs, ABBA order")
    parser.add_argument("--cache-dir", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.examples < 1 or args.repeats < 1:
        parser.error("--examples and --repeats must be at least 1")

    import tempfile

    from transformers import AutoTokenizer

    from loraplex.server import default_model
    from loraplex.server.adapters.validation import BaseModelShapes, InvalidAdapter, inspect_adapter
    from loraplex.server.training import data, demo

    cache_dir = args.cache_dir or default_model.default_cache_dir()
    try:  # the server's own checks: a wrong --adapter is one line, not a traceback from the engine
        inspect_adapter(args.adapter, MAX_LORA_RANK)  # before the model is converted
        model_dir = default_model.ensure_default_model(cache_dir)
        adapter = inspect_adapter(args.adapter, MAX_LORA_RANK, BaseModelShapes.from_model_dir(model_dir))
    except InvalidAdapter as exc:
        parser.error(f"--adapter: {exc}")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with tempfile.TemporaryDirectory() as scratch:
        eval_path = args.eval or demo.write_demo_data(Path(scratch), 1, args.examples)[1]
        examples = data.load_examples(eval_path, tokenizer)[:args.examples]
    prompts = [e.prompt for e in examples]
    token_ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    out: dict = {"examples": len(prompts), "prompt_tokens": sum(map(len, token_ids)),
                 "max_new_tokens": args.max_new_tokens, "runs": []}
    print(f"{len(prompts)} examples, {out['prompt_tokens']} prompt tokens; base + adapter each", file=sys.stderr)
    predictions: dict[str, dict[str, list[str]]] = {}
    for repeat in range(args.repeats):
        order = ("engine", "hf") if repeat % 2 == 0 else ("hf", "engine")
        for side in order:
            if side == "engine":
                seconds, predictions[side], served = run_engine(model_dir, args.adapter, adapter, token_ids,
                                                                args.max_new_tokens, args.max_length, cache_dir)
                out["engine_served"] = served
            else:
                seconds, predictions[side] = run_hf(model_dir, args.adapter, prompts, args.max_new_tokens,
                                                    args.batch_size)
            out["runs"].append({"side": side, "seconds": round(seconds, 1)})
            print(f"{side}: {seconds:.1f} s", file=sys.stderr)
    for side in ("engine", "hf"):
        out[f"{side}_seconds"] = statistics.median(r["seconds"] for r in out["runs"] if r["side"] == side)
    out["hf_vs_engine"] = round(out["hf_seconds"] / out["engine_seconds"], 2)
    out["same_prediction"] = {label: sum(a.strip() == b.strip() for a, b in zip(predictions["engine"][label],
                                                                                  predictions["hf"][label]))
                              for label in ("base", "adapter")}
    print(json.dumps(out, indent=2))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
