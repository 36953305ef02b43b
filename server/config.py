"""Configuration dataclasses, one per concern.

They are filled only by ``server.cli`` (argv); nothing here reads the environment.
Defaults are sized for a 2-core, 24 GiB machine without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

LORA_KERNEL_CHOICES = ("auto", "loraplex", "vllm")
LORA_DTYPE_CHOICES = ("auto", "bfloat16", "float16")  # vLLM's own
JSON_WHITESPACE_CHOICES = ("compact", "any")


@dataclass(frozen=True)
class ModelConfig:
    """Which base model to serve."""

    # A local Hugging Face-format causal LM directory; None = the embedded SmolLM2 default.
    model_dir: Path | None = None
    # Name clients use in the `model` field for the base model; None = derived from the model.
    served_model_name: str | None = None
    # Where the embedded default is converted to bf16 safetensors (once).
    cache_dir: Path | None = None


@dataclass(frozen=True)
class EngineConfig:
    """How the in-process vLLM engine is built."""

    model_path: str
    dtype: str = "auto"  # resolved by the engine: bf16 where the hardware multiplies it natively
    max_model_len: int = 2048
    # KV cache budget in GiB (on CPU vLLM reserves this much RAM).
    kv_cache_gib: float = 2.0
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 4096
    # Tokens per KV-cache block: also the prefix cache's unit (only whole blocks are shared). None =
    # vLLM's default (128 on CPUs, where prompts sharing a 70-token system prompt then share nothing).
    block_size: int | None = None
    # LoRA: adapters resident in one batch, their max rank, and the CPU-side LRU cache size.
    max_loras: int = 8
    max_lora_rank: int = 16
    max_cpu_loras: int = 32
    # The dtype vLLM stores adapter weights in: "auto" = the model's (vLLM's default); bfloat16 or
    # float16 under a float32 model halves the bytes each adapter reads a step (and its memory),
    # and rounds its weights: each LoRA delta moves by ~2^-8 (bfloat16) of itself.
    lora_dtype: str = "auto"
    # Modules vLLM wraps with LoRA layers; None = every supported module (embeddings and lm_head
    # too, whose per-token ops then run on every step even if no adapter targets them).
    lora_target_modules: tuple[str, ...] | None = None
    # Which batched-LoRA ops vLLM uses: ours ("loraplex"), vLLM's stock ones ("vllm"), or "auto":
    # ours on CPUs, vLLM's on GPUs (ours have not been measured ahead of vLLM's on a GPU yet).
    lora_kernels: str = "auto"
    enable_lora: bool = True
    seed: int = 0
    enforce_eager: bool | None = None  # None: eager on CPUs, CUDA graphs on GPUs
    # JSON from structured outputs: "compact" (no whitespace between tokens: fewer tokens, and a
    # small model cannot loop on newlines until max_tokens) or "any" (vLLM's default).
    json_whitespace: str = "compact"
    # CPU-seconds one structured-output constraint may take to compile (server/grammar_budget.py),
    # checked once per constraint in a child process before the engine compiles it; None: unbounded.
    grammar_compile_budget_s: float | None = 10.0
    # CPU-milliseconds one token's mask may cost to fill for a constraint (vLLM fills each
    # structured request's mask on the engine's thread at every step, so the whole batch waits for
    # it), tried on sample steps with the compile; None: not tried. Needs the compile budget on.
    grammar_mask_budget_ms: float | None = 50.0
    # CPU engines: cores kept free of the engine's compute threads for this process (None: vLLM's
    # default, one). A server needs its core for the doors; a batch job (the training evaluation) does not.
    cpu_reserved_cores: int | None = None
    # Scale-out inside one server, passed straight to vLLM (GPUs: tensor/pipeline parallel across
    # a node's GPUs; data parallel replicas behind this one front door).
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1

    def __post_init__(self) -> None:
        if self.json_whitespace not in JSON_WHITESPACE_CHOICES:
            raise ValueError(f"json_whitespace must be one of {JSON_WHITESPACE_CHOICES}")
        if self.lora_kernels not in LORA_KERNEL_CHOICES:
            raise ValueError(f"lora_kernels must be one of {LORA_KERNEL_CHOICES}, got {self.lora_kernels!r}")
        if self.lora_dtype not in LORA_DTYPE_CHOICES:
            raise ValueError(f"lora_dtype must be one of {LORA_DTYPE_CHOICES}, got {self.lora_dtype!r}")
        if self.max_loras < 1 or self.max_cpu_loras < self.max_loras:
            raise ValueError("need 1 <= max_loras <= max_cpu_loras")
        if self.kv_cache_gib <= 0:
            raise ValueError("kv_cache_gib must be positive")
        if self.grammar_compile_budget_s is not None and not self.grammar_compile_budget_s > 0:
            raise ValueError("grammar_compile_budget_s must be positive (None: unbounded)")
        if self.grammar_mask_budget_ms is not None and not self.grammar_mask_budget_ms > 0:
            raise ValueError("grammar_mask_budget_ms must be positive (None: not tried)")
        if self.block_size is not None and not (16 <= self.block_size <= 256 and self.block_size % 16 == 0):
            raise ValueError(f"block_size must be a multiple of 16 from 16 to 256, got {self.block_size}")


@dataclass(frozen=True)
class AdapterConfig:
    """Where adapters come from."""

    adapter_dir: Path | None = None
    # If set, admin loads may only read adapters under these directories (after resolving symlinks).
    allowed_roots: tuple[Path, ...] = ()
    # Poll --adapter-dir this often for new/changed/removed adapters; 0 = only at start.
    watch_interval_s: float = 2.0
    # Loaded into the engine first at start (the rest of the directory loads on first request
    # once --max-cpu-loras are resident), and pinned ones never leave the engine's cache.
    preload: tuple[str, ...] = ()
    pinned: tuple[str, ...] = ()
    # The server-owned snapshot store the engine reads adapters from (read-only copies, by
    # content hash); None = a fresh temporary directory, removed at exit.
    store_dir: Path | None = None


@dataclass(frozen=True)
class LimitsConfig:
    """Per-request bounds enforced by both front doors before anything reaches the engine."""

    max_n: int = 8
    max_tokens: int = 1024
    max_prompt_tokens: int | None = None  # None = the model's context length
    max_stop_sequences: int = 8
    max_stop_length: int = 64
    max_chat_messages: int = 256
    max_payload_bytes: int = 1 << 20
    max_logprobs: int = 20  # top alternatives per token (vLLM's own ceiling is 20 by default)
    max_logit_bias: int = 300  # tokens one request may bias (OpenAI's own ceiling)
    max_stop_token_ids: int = 64
    # structured outputs (server/structured.py)
    max_schema_bytes: int = 32 << 10
    max_schema_depth: int = 24
    max_regex_chars: int = 2048
    max_choices: int = 256
    max_choice_chars: int = 256

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if name == "max_prompt_tokens" and value is None:
                continue
            least = 0 if name == "max_logprobs" else 1
            if value < least:
                raise ValueError(f"{name} must be at least {least}, got {value}")


@dataclass(frozen=True)
class AdmissionConfig:
    """Admission control in front of the engine (server/admission.py)."""

    max_concurrent: int = 64  # requests admitted into the engine at once
    max_queued: int = 256  # waiting behind them; beyond this, 429 at once
    # Refuse (429) when the estimated queueing delay exceeds this; None = only the client's deadline.
    max_queue_wait_s: float | None = None
    # Fair-share weights per adapter name (default 1.0; the base model's key is "").
    adapter_weights: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if self.max_concurrent < 1 or self.max_queued < 0:
            raise ValueError("need max_concurrent >= 1 and max_queued >= 0")
        if any(weight <= 0 for _, weight in self.adapter_weights):
            raise ValueError("adapter weights must be positive")


@dataclass(frozen=True)
class ServerConfig:
    """The HTTP front door."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    # Admin routes/RPCs (adapter load/unload) need this token; None disables them.
    admin_token: str | None = None
    grpc_port: int | None = None
    # Per-adapter metric series: at most this many adapters get their own label, the rest "other".
    metrics_max_adapters: int = 32
    # On SIGTERM: refuse new requests (503), let admitted ones finish for at most this long, exit.
    drain_timeout_s: float = 30.0
    # Opt-in: append served prompt/completion pairs per model to JSONL here (sensitive data).
    capture_dir: Path | None = None
    # A streaming client that reads nothing for this long is cut off (its request aborted).
    stream_send_timeout_s: float = 30.0
    # HTTP: request headers must arrive within this many seconds, and fit in this many bytes.
    header_timeout_s: float = 10.0
    max_header_bytes: int = 32 << 10
    log_level: str = "info"
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)

    def __post_init__(self) -> None:
        for name, port in (("port", self.port), ("grpc_port", self.grpc_port)):
            if port is not None and not 0 <= port <= 65535:
                raise ValueError(f"{name} must be in 0..65535, got {port}")
        for name in ("stream_send_timeout_s", "header_timeout_s", "max_header_bytes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.drain_timeout_s >= 0 or self.metrics_max_adapters < 0:
            raise ValueError("drain_timeout_s and metrics_max_adapters must not be negative")


DEFAULT_TRAIN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class TrainConfig:
    """``loraplex train``: LoRA SFT of one adapter (a preset file fills the hyper-parameters,
    flags override it)."""

    train_path: Path
    out_dir: Path
    eval_path: Path | None = None
    model_dir: Path | None = None  # None = the embedded default
    cache_dir: Path | None = None
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_TRAIN_TARGETS
    learning_rate: float = 2e-4
    warmup_fraction: float = 0.05
    weight_decay: float = 0.0
    epochs: float = 1.0
    batch_size: int = 8
    max_length: int = 512
    max_steps: int | None = None  # stops earlier than `epochs` if set
    seed: int = 0
    device: str = "auto"  # "auto" = cuda when present, else cpu
    replay_path: Path | None = None
    replay_ratio: float = 0.0
    # Evaluation: generation for exact-match / field accuracy on at most this many eval examples.
    eval_generate: int = 200
    eval_batch_size: int = 32
    eval_max_new_tokens: int = 64
    compare_base: bool = True
    # A JSON schema of the task's answers: the evaluation then also runs base and adapter with it
    # as structured output (the strongest cheap alternative to an adapter: a base model forced into it).
    eval_schema: dict | None = None
    # Hot-load into a running server when done.
    serve_url: str | None = None
    admin_token: str | None = None
    adapter_name: str | None = None  # None = the output directory's name

    def __post_init__(self) -> None:
        if self.rank < 1 or self.batch_size < 1 or self.max_length < 8 or self.epochs <= 0:
            raise ValueError("rank, batch_size, epochs must be positive and max_length >= 8")
        if not 0 <= self.replay_ratio < 1:
            raise ValueError("replay_ratio must be in [0, 1)")
        if self.replay_ratio and self.replay_path is None:
            raise ValueError("replay_ratio needs a replay file")
