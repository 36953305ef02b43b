"""Configuration dataclasses, one per concern.

They are filled only by ``server.cli`` (argv); nothing here reads the environment.
Defaults are sized for a 2-core, 24 GiB machine without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

LORA_KERNEL_CHOICES = ("loraplex", "vllm")


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
    # LoRA: adapters resident in one batch, their max rank, and the CPU-side LRU cache size.
    max_loras: int = 8
    max_lora_rank: int = 16
    max_cpu_loras: int = 32
    # Modules vLLM wraps with LoRA layers; None = every supported module (embeddings and lm_head
    # too, whose per-token ops then run on every step even if no adapter targets them).
    lora_target_modules: tuple[str, ...] | None = None
    # Which batched-LoRA ops vLLM uses: ours ("loraplex") or vLLM's stock ones ("vllm").
    lora_kernels: str = "loraplex"
    enable_lora: bool = True
    seed: int = 0
    enforce_eager: bool = True

    def __post_init__(self) -> None:
        if self.lora_kernels not in LORA_KERNEL_CHOICES:
            raise ValueError(f"lora_kernels must be one of {LORA_KERNEL_CHOICES}, got {self.lora_kernels!r}")
        if self.max_loras < 1 or self.max_cpu_loras < self.max_loras:
            raise ValueError("need 1 <= max_loras <= max_cpu_loras")
        if self.kv_cache_gib <= 0:
            raise ValueError("kv_cache_gib must be positive")


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


@dataclass(frozen=True)
class LimitsConfig:
    """Per-request bounds enforced by both front doors before anything reaches the engine."""

    max_n: int = 8
    max_tokens: int = 1024
    max_stop_sequences: int = 8
    max_stop_length: int = 64
    max_chat_messages: int = 256
    max_payload_bytes: int = 1 << 20


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
    log_level: str = "info"
    limits: LimitsConfig = field(default_factory=LimitsConfig)
