"""The one wrapper around vLLM's ``AsyncLLM``: generate (streamed), abort, add/remove/pin adapters.

The engine runs in the server's own process and event loop (vLLM's engine core runs in a
child process it spawns itself). Nothing else in the server imports vLLM.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from .adapters.registry import AdapterVersion
from .config import EngineConfig

logger = logging.getLogger(__name__)

GiB = 1 << 30


@dataclass(frozen=True)
class SamplingOptions:
    """Engine-independent sampling parameters, already validated by the front door."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stream: bool = False
    ignore_eos: bool = False


@dataclass
class GenerationChunk:
    """What one engine step produced for one choice (``index``) of a request."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    num_prompt_tokens: int


class EngineUnavailable(RuntimeError):
    pass


@dataclass
class FinishedTiming:
    """Engine-side phases of one finished request, in seconds."""

    queued_s: float
    prefill_s: float
    decode_s: float


@dataclass
class EngineStepStats:
    """What the engine reports after a step (plain data; no vLLM types leave this module)."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float  # 0..1
    running_adapters: list[str]
    waiting_adapters: list[str]


def _stats_relay_factory(on_stats):
    """A vLLM stat logger that hands each step's stats to ``on_stats`` in the server's loop."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class StatsRelay(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0) -> None:
            pass

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
            finished = [FinishedTiming(f.queued_time, f.prefill_time, f.decode_time)
                        for f in (iteration_stats.finished_requests if iteration_stats else ())]
            if scheduler_stats is None:
                if finished:
                    on_stats(None, finished)
                return
            on_stats(EngineStepStats(
                num_running=scheduler_stats.num_running_reqs, num_waiting=scheduler_stats.num_waiting_reqs,
                kv_cache_usage=scheduler_stats.kv_cache_usage,
                running_adapters=sorted(scheduler_stats.running_lora_adapters),
                waiting_adapters=sorted(scheduler_stats.waiting_lora_adapters)), finished)

        def log_engine_initialized(self) -> None:
            pass

    return StatsRelay


def resolve_dtype(dtype: str) -> str:
    """``auto``: bfloat16 on GPUs and on CPUs that multiply bf16 natively (AVX512-BF16/AMX);
    float32 on other CPUs, where bf16 matmuls are emulated and ~3x slower than fp32."""
    if dtype != "auto":
        return dtype
    import torch

    if torch.cuda.is_available():
        return "bfloat16"
    native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return "bfloat16" if native else "float32"


def build_engine_args(config: EngineConfig):
    from vllm.engine.arg_utils import AsyncEngineArgs

    return AsyncEngineArgs(
        model=config.model_path,
        tokenizer=config.model_path,
        dtype=resolve_dtype(config.dtype),
        max_model_len=config.max_model_len,
        kv_cache_memory_bytes=int(config.kv_cache_gib * GiB),
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        enable_lora=config.enable_lora,
        max_loras=config.max_loras,
        max_lora_rank=config.max_lora_rank,
        max_cpu_loras=config.max_cpu_loras,
        lora_target_modules=list(config.lora_target_modules) if config.lora_target_modules else None,
        seed=config.seed,
        enforce_eager=config.enforce_eager,
        tensor_parallel_size=config.tensor_parallel_size,
        pipeline_parallel_size=config.pipeline_parallel_size,
        data_parallel_size=config.data_parallel_size,
        disable_log_stats=True,
    )


class Engine:
    """Owns the ``AsyncLLM``. Create with :meth:`start` inside the running event loop."""

    def __init__(self, config: EngineConfig, llm) -> None:
        self.config = config
        self._llm = llm
        self.tokenizer = llm.get_tokenizer()
        # Slots this server removed itself (so that other disappearances count as LRU evictions).
        self.removed_slots: set[int] = set()

    @classmethod
    def start(cls, config: EngineConfig, on_stats=None) -> "Engine":
        """``on_stats(step: EngineStepStats | None, finished: list[FinishedTiming])`` is called
        after every engine step (from the server's event loop)."""
        from vllm.v1.engine.async_llm import AsyncLLM

        logger.info("starting vLLM engine on %s (lora_kernels=%s)", config.model_path, config.lora_kernels)
        stat_loggers = [_stats_relay_factory(on_stats)] if on_stats else None
        llm = AsyncLLM.from_engine_args(build_engine_args(config), stat_loggers=stat_loggers)
        return cls(config, llm)

    # -- generation -----------------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        return not self._llm.errored

    async def generate(
        self,
        prompt_token_ids: list[int],
        options: SamplingOptions,
        request_id: str,
        adapter: AdapterVersion | None = None,
    ) -> AsyncIterator[GenerationChunk]:
        """Yield new text per choice as the engine produces it (deltas when streaming,
        one final chunk per choice otherwise). Cancelling the iteration aborts the request."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        if self._llm.errored:
            raise EngineUnavailable("the engine is not running")
        params = SamplingParams(
            n=options.n,
            temperature=options.temperature,
            top_p=options.top_p,
            max_tokens=options.max_tokens,
            stop=list(options.stop) or None,
            seed=options.seed,
            presence_penalty=options.presence_penalty,
            frequency_penalty=options.frequency_penalty,
            ignore_eos=options.ignore_eos,
            output_kind=RequestOutputKind.DELTA if options.stream else RequestOutputKind.FINAL_ONLY,
        )
        from vllm.v1.engine.exceptions import EngineDeadError

        outputs = self._llm.generate({"prompt_token_ids": prompt_token_ids}, params, request_id,
                                     lora_request=self._lora_request(adapter))
        try:
            async for output in outputs:
                num_prompt_tokens = len(output.prompt_token_ids or prompt_token_ids)
                for completion in output.outputs:
                    yield GenerationChunk(
                        index=completion.index,
                        text=completion.text,
                        token_ids=list(completion.token_ids),
                        finish_reason=completion.finish_reason,
                        num_prompt_tokens=num_prompt_tokens,
                    )
        except EngineDeadError as exc:
            raise EngineUnavailable("the engine has failed; this request was not completed") from exc

    async def abort(self, request_id: str) -> None:
        await self._llm.abort(request_id)

    def num_unfinished_requests(self) -> int:
        return self._llm.get_num_unfinished_requests()

    # -- adapters -------------------------------------------------------------------------------
    @staticmethod
    def _lora_request(adapter: AdapterVersion | None):
        if adapter is None:
            return None
        from vllm.lora.request import LoRARequest

        return LoRARequest(
            lora_name=f"{adapter.name}@v{adapter.version}",
            lora_int_id=adapter.adapter_slot,
            lora_path=str(adapter.path),
        )

    async def add_adapter(self, adapter: AdapterVersion) -> None:
        """Load ``adapter`` into the engine's CPU cache, so its first request does not pay for it."""
        await self._llm.add_lora(self._lora_request(adapter))

    async def resident_adapter_slots(self) -> set[int]:
        """Adapter slots loaded in the engine's CPU-side cache."""
        return set(await self._llm.list_loras())

    async def remove_adapter(self, adapter: AdapterVersion) -> None:
        self.removed_slots.add(adapter.adapter_slot)
        await self._llm.remove_lora(adapter.adapter_slot)

    def shutdown(self) -> None:
        self._llm.shutdown()
