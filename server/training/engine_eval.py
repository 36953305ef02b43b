"""Greedy generations for ``loraplex train``'s evaluation, on the serving engine: vLLM in-process
with loraplex's LoRA kernels and the new adapter loaded, every prompt of every variant (base,
adapter, each with or without a JSON schema as structured output) submitted at once so the engine
batches them as it would serve them."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from pathlib import Path

ADAPTER_NAME = "candidate"


@dataclass(frozen=True)
class Variant:
    label: str  # the report's key: base, base+schema, adapter, adapter+schema
    with_adapter: bool
    with_schema: bool


def variants(compare_base: bool, schema: dict | None) -> list[Variant]:
    out = [Variant("base", False, False)] if compare_base else []
    if compare_base and schema is not None:
        out.append(Variant("base+schema", False, True))
    out.append(Variant("adapter", True, False))
    if schema is not None:
        out.append(Variant("adapter+schema", True, True))
    return out


@dataclass(frozen=True)
class EvalEngineConfig:
    model_dir: Path
    adapter_dir: Path
    rank: int
    target_modules: tuple[str, ...] | None  # None: every module vLLM supports
    max_new_tokens: int
    max_model_len: int
    kv_cache_gib: float = 4.0
    max_num_seqs: int = 256
    # The prefix cache shares whole blocks only: at vLLM's CPU default (128) prompts that open with
    # the same ~70 tokens (chat template, system prompt, the task's instruction) share nothing; at
    # 32 they share their first two blocks, and the schema variants reuse almost all of their plain
    # twins' prompts. The evaluation is prefill-bound, so this is its largest cut (~1.3x measured).
    block_size: int = 32
    # Where the server's compiled op for small CPU steps is built (None: our torch ops only). The
    # evaluation runs the kernels that will serve the adapter: the same as ``loraplex serve``'s.
    compiled_ops_cache: Path | None = None


def checked_schema(schema: dict):
    """The task's schema through the server's own bounds (a ``StructuredSpec``); raises
    ``InvalidRequest`` with the server's message."""
    from ..config import LimitsConfig
    from ..structured import StructuredInput, check_structured

    return check_structured(StructuredInput(json_schema=schema), LimitsConfig())


def max_lora_rank(rank: int) -> int:
    """The smallest rank slot vLLM offers that holds ``rank`` (8, 16, 32, ...)."""
    return max(8, 2 ** math.ceil(math.log2(rank)))


def generate(config: EvalEngineConfig, prompts: list[list[int]], wanted: list[Variant],
             schema: dict | None) -> tuple[dict[str, list[str]], dict]:
    """({variant label: one completion per prompt}, what served them: dtype, kernels). Starts and
    stops its own engine."""
    return asyncio.run(_generate(config, prompts, wanted, schema))


async def _generate(config: EvalEngineConfig, prompts: list[list[int]], wanted: list[Variant],
                    schema: dict | None) -> tuple[dict[str, list[str]], dict]:
    from loraplex.kernels.vllm_plugin import compiled_ops_cache, effective_lora_kernels, select_lora_kernels

    from ..adapters.registry import AdapterRegistry
    from ..config import EngineConfig
    from ..engine import Engine, SamplingOptions

    select_lora_kernels("auto", compiled_ops_cache=config.compiled_ops_cache)
    served = {"kernels": effective_lora_kernels(), "compiled_op": compiled_ops_cache() is not None}
    longest = max((len(p) for p in prompts), default=1)
    engine = Engine.start(EngineConfig(
        model_path=str(config.model_dir), max_model_len=max(config.max_model_len, longest + config.max_new_tokens),
        kv_cache_gib=config.kv_cache_gib, max_num_seqs=config.max_num_seqs, block_size=config.block_size,
        max_loras=1, max_cpu_loras=1,
        max_lora_rank=max_lora_rank(config.rank), lora_target_modules=config.target_modules,
        # the training process waits: every core computes; the task's own schema needs no compile budget
        cpu_reserved_cores=0, grammar_compile_budget_s=None,
        grammar_mask_budget_ms=None))
    try:
        adapter = AdapterRegistry("base").register_in_place(ADAPTER_NAME, config.adapter_dir)
        await engine.add_adapter(adapter)
        structured = None if schema is None else checked_schema(schema)
        if structured is not None:  # the engine's own compile check, once, before any generation
            await engine.check_options(SamplingOptions(max_tokens=1, structured=structured))

        async def one(variant: Variant, index: int, prompt: list[int]) -> str:
            options = SamplingOptions(max_tokens=config.max_new_tokens, temperature=0.0,
                                      structured=structured if variant.with_schema else None)
            text = ""
            async for chunk in engine.generate(prompt, options, f"{variant.label}-{index}",
                                               adapter if variant.with_adapter else None):
                text += chunk.text
            return text

        outputs = await asyncio.gather(*[one(v, i, p) for v in wanted for i, p in enumerate(prompts)])
    finally:
        engine.shutdown()
    return ({v.label: outputs[k * len(prompts):(k + 1) * len(prompts)] for k, v in enumerate(wanted)},
            {**served, "dtype": engine.served_dtype})
