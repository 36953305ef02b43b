"""The ``loraplex`` command line (for developers: the only place that reads argv and the environment).

Subcommands: ``serve`` (the server), ``train`` (fine-tune an adapter), ``loadtest`` (open-loop
load against a server).
Each builds its config dataclasses from flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import sys
from pathlib import Path

from .config import (
    JSON_WHITESPACE_CHOICES,
    LORA_DTYPE_CHOICES,
    LORA_KERNEL_CHOICES,
    AdapterConfig,
    AdmissionConfig,
    EngineConfig,
    LimitsConfig,
    ModelConfig,
    ServerConfig,
)


def _adapter_weight(text: str) -> tuple[str, float]:
    name, sep, weight = text.rpartition("=")
    try:
        value = float(weight)
    except ValueError:
        value = 0.0
    if not sep or not name or value <= 0:
        raise argparse.ArgumentTypeError(f"expected NAME=WEIGHT with a positive weight, got {text!r}")
    return name, value


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    defaults_engine = EngineConfig(model_path="")
    defaults_limits = LimitsConfig()
    model = p.add_argument_group("model")
    model.add_argument("--model", type=Path, default=None,
                       help="local Hugging Face-format causal LM directory (default: embedded SmolLM2-135M-Instruct)")
    model.add_argument("--served-model-name", default=None, help="name clients use for the base model")
    model.add_argument("--cache-dir", type=Path, default=None,
                       help="where the embedded model is converted once (default: ~/.cache/loraplex)")
    engine = p.add_argument_group("engine")
    engine.add_argument("--dtype", default=defaults_engine.dtype, choices=("auto", "bfloat16", "float16", "float32"),
                        help="auto: bfloat16 where the hardware multiplies it natively, else float32")
    engine.add_argument("--max-model-len", type=int, default=defaults_engine.max_model_len)
    engine.add_argument("--kv-cache-gib", type=float, default=defaults_engine.kv_cache_gib,
                        help="KV cache budget in GiB (RAM on CPU)")
    engine.add_argument("--max-num-seqs", type=int, default=defaults_engine.max_num_seqs)
    engine.add_argument("--max-num-batched-tokens", type=int, default=defaults_engine.max_num_batched_tokens)
    engine.add_argument("--block-size", type=int, default=defaults_engine.block_size,
                        help="tokens per KV-cache block, the prefix cache's unit (default: vLLM's, 128 on CPUs)")
    engine.add_argument("--max-loras", type=int, default=defaults_engine.max_loras,
                        help="adapters that can share one batch")
    engine.add_argument("--max-lora-rank", type=int, default=defaults_engine.max_lora_rank)
    engine.add_argument("--max-cpu-loras", type=int, default=defaults_engine.max_cpu_loras,
                        help="adapters kept loaded in the engine's CPU-side cache (LRU)")
    engine.add_argument("--lora-dtype", choices=LORA_DTYPE_CHOICES, default=defaults_engine.lora_dtype,
                        help="dtype adapter weights are stored in: auto = the model's; bfloat16 under a float32 "
                             "model halves what each adapter reads a step, and rounds its weights")
    engine.add_argument("--lora-kernels", choices=LORA_KERNEL_CHOICES, default=defaults_engine.lora_kernels,
                        help="batched-LoRA ops: loraplex's own or vLLM's stock ones")
    engine.add_argument("--seed", type=int, default=defaults_engine.seed)
    engine.add_argument("--json-whitespace", choices=JSON_WHITESPACE_CHOICES, default=defaults_engine.json_whitespace,
                        help="JSON from response_format: compact (default: fewer tokens, no runaway newlines "
                             "from small models) or any (whitespace as the model likes, vLLM's default)")
    engine.add_argument("--max-grammar-compile-s", type=float, default=defaults_engine.grammar_compile_budget_s,
                        help="CPU-seconds a new structured-output constraint may take to compile (checked once "
                             "per constraint, before the engine compiles it; over it: 400); 0: unbounded")
    engine.add_argument("--max-grammar-mask-ms", type=float, default=defaults_engine.grammar_mask_budget_ms,
                        help="CPU-milliseconds one token's mask may cost for a new structured-output constraint, "
                             "tried on sample steps with its compile (the engine's batch waits for each mask at "
                             "every step; over it: 400), and the most a model's structured requests in flight may "
                             "cost together (over it: 429); 0: not tried")
    engine.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=defaults_engine.enforce_eager,
                        help="eager execution; default: on for CPUs, off for GPUs (CUDA graphs)")
    engine.add_argument("--tensor-parallel-size", type=int, default=defaults_engine.tensor_parallel_size, help="vLLM: GPUs per model shard group")
    engine.add_argument("--pipeline-parallel-size", type=int, default=defaults_engine.pipeline_parallel_size, help="vLLM: pipeline stages")
    engine.add_argument("--data-parallel-size", type=int, default=defaults_engine.data_parallel_size, help="vLLM: engine replicas in this server")
    adapters = p.add_argument_group("adapters")
    adapters.add_argument("--adapter-dir", type=Path, default=None,
                          help="every subdirectory holding a PEFT LoRA adapter is served under its name")
    adapters.add_argument("--allowed-adapter-roots", type=Path, nargs="*", default=(),
                          help="admin loads may only read adapters under these directories")
    adapters.add_argument("--watch-interval", type=float, default=AdapterConfig.watch_interval_s,
                          help="seconds between scans of --adapter-dir for new/changed/removed adapters (0: off)")
    adapters.add_argument("--preload", nargs="*", default=(), help="adapters loaded into the engine first at start")
    adapters.add_argument("--pin", nargs="*", default=(), help="adapters kept resident (never evicted)")
    adapters.add_argument("--adapter-store", type=Path, default=None,
                          help="where read-only snapshots of registered adapter versions are kept (the engine "
                               "reads only these; default: a temporary directory removed at exit)")
    server = p.add_argument_group("server")
    server.add_argument("--host", default=ServerConfig.host)
    server.add_argument("--port", type=int, default=ServerConfig.port)
    server.add_argument("--grpc-port", type=int, default=50051, help="gRPC port (-1: no gRPC front door)")
    server.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on inference calls")
    server.add_argument("--admin-token", default=None,
                        help="enables adapter admin routes/RPCs, which need 'Authorization: Bearer TOKEN'")
    server.add_argument("--api-key-file", type=Path, default=None, help="read --api-key from this file")
    server.add_argument("--admin-token-file", type=Path, default=None,
                        help="read --admin-token from this file (a mounted secret; keeps it out of `ps`)")
    server.add_argument("--max-n", type=int, default=defaults_limits.max_n)
    server.add_argument("--max-tokens-limit", type=int, default=defaults_limits.max_tokens,
                        help="largest max_tokens a request may ask for")
    server.add_argument("--metrics-max-adapters", type=int, default=ServerConfig.metrics_max_adapters,
                        help="adapters with their own metric label; the rest are folded into 'other'")
    server.add_argument("--capture-dir", type=Path, default=None,
                        help="opt-in: append each served prompt/completion per model to DIR/<model>.jsonl in "
                             "the training format (holds users' data verbatim: treat as sensitive)")
    server.add_argument("--max-prompt-tokens", type=int, default=defaults_limits.max_prompt_tokens,
                        help="longest prompt accepted, in tokens (default: the model's context)")
    server.add_argument("--stream-send-timeout", type=float, default=ServerConfig.stream_send_timeout_s,
                        help="seconds a streaming client may read nothing before it is cut off (request aborted)")
    server.add_argument("--header-timeout", type=float, default=ServerConfig.header_timeout_s,
                        help="seconds a client may take to send its HTTP request headers")
    server.add_argument("--max-header-bytes", type=int, default=ServerConfig.max_header_bytes,
                        help="largest HTTP request header block accepted")
    server.add_argument("--drain-timeout", type=float, default=ServerConfig.drain_timeout_s,
                        help="on SIGTERM: seconds admitted requests may take to finish before exit")
    admission = p.add_argument_group("admission control")
    defaults_admission = AdmissionConfig()
    admission.add_argument("--max-concurrent", type=int, default=defaults_admission.max_concurrent,
                           help="requests admitted into the engine at once")
    admission.add_argument("--max-queued", type=int, default=defaults_admission.max_queued,
                           help="requests waiting for admission; beyond this 429 at once")
    admission.add_argument("--max-queue-wait", type=float, default=defaults_admission.max_queue_wait_s,
                           help="seconds: 429 at once when the estimated queueing delay exceeds this")
    admission.add_argument("--adapter-weight", action="append", default=[], metavar="NAME=WEIGHT",
                           type=_adapter_weight, help="fair-share weight of an adapter (default 1; repeatable)")
    server.add_argument("--log-level", default=ServerConfig.log_level, choices=("debug", "info", "warning", "error"))
    server.add_argument("--log-format", default="text", choices=("text", "json"), help="json: one object a line")


# Subcommands wired from their own packages; this module only dispatches to them.
COMMAND_MODULES = {"train": "loraplex.server.training.cli", "loadtest": "loraplex.loadtest.cli"}
SUBCOMMANDS = {"train": "fine-tune a LoRA adapter (peft) and compare it with the base",
               "loadtest": "load-test a server against a latency target"}

USAGE = """Serve many fine-tuned LoRA adapters over one base LLM (vLLM in-process), behind an
OpenAI-compatible HTTP API and gRPC; train new adapters; load-test latency targets."""

SERVE_HELP = """Serve a base model and its LoRA adapters. With no --model, the embedded SmolLM2-135M-Instruct.
Clients pick an adapter by name in the request's `model` field; adapters in --adapter-dir are
served under their directory names and, with --admin-token, loaded and unloaded at runtime.
Example: loraplex serve --adapter-dir adapters --admin-token-file token.txt"""

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex", description=USAGE)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{serve,train,loadtest}")
    formatter = argparse.RawDescriptionHelpFormatter
    _add_serve_args(sub.add_parser("serve", help="serve the base model and its LoRA adapters",
                                   description=SERVE_HELP, formatter_class=formatter))
    for name, summary in SUBCOMMANDS.items():
        command = importlib.import_module(COMMAND_MODULES[name])
        command.add_args(sub.add_parser(name, help=summary, description=command.HELP, formatter_class=formatter))
    return parser


def _serve_configs(args: argparse.Namespace) -> tuple[EngineConfig, AdapterConfig, ServerConfig]:
    """(engine, adapter, server) configs from the serve arguments (the engine's model path left
    empty: it is resolved after); raises ``ValueError`` for a value out of range or an unreadable
    token file."""
    engine_config = EngineConfig(
        model_path="", dtype=args.dtype, max_model_len=args.max_model_len,
        kv_cache_gib=args.kv_cache_gib, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size, max_loras=args.max_loras,
        max_lora_rank=args.max_lora_rank, max_cpu_loras=args.max_cpu_loras, lora_dtype=args.lora_dtype,
        lora_kernels=args.lora_kernels, seed=args.seed, enforce_eager=args.enforce_eager,
        json_whitespace=args.json_whitespace, grammar_compile_budget_s=args.max_grammar_compile_s or None,
        grammar_mask_budget_ms=args.max_grammar_mask_ms or None,
        tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size, data_parallel_size=args.data_parallel_size)
    for flag in ("api_key", "admin_token"):
        path = getattr(args, f"{flag}_file")
        if path is not None:
            try:
                setattr(args, flag, path.read_text().strip() or None)
            except (OSError, UnicodeDecodeError) as exc:  # gone, unreadable, or not text
                raise ValueError(f"--{flag.replace('_', '-')}-file: {exc}") from exc
    server_config = ServerConfig(
        host=args.host, port=args.port, grpc_port=None if args.grpc_port < 0 else args.grpc_port,
        api_key=args.api_key, admin_token=args.admin_token, log_level=args.log_level,
        metrics_max_adapters=args.metrics_max_adapters, capture_dir=args.capture_dir,
        drain_timeout_s=args.drain_timeout, stream_send_timeout_s=args.stream_send_timeout,
        header_timeout_s=args.header_timeout, max_header_bytes=args.max_header_bytes,
        limits=LimitsConfig(max_n=args.max_n, max_tokens=args.max_tokens_limit,
                            max_prompt_tokens=args.max_prompt_tokens),
        admission=AdmissionConfig(max_concurrent=args.max_concurrent, max_queued=args.max_queued,
                                  max_queue_wait_s=args.max_queue_wait, adapter_weights=tuple(args.adapter_weight)))
    adapter_config = AdapterConfig(adapter_dir=args.adapter_dir, allowed_roots=tuple(args.allowed_adapter_roots),
                                   watch_interval_s=args.watch_interval, preload=tuple(args.preload),
                                   pinned=tuple(args.pin), store_dir=args.adapter_store)
    return engine_config, adapter_config, server_config


def serve(args: argparse.Namespace) -> int:
    from . import default_model
    from .app import run

    try:  # a value out of range is the operator's mistake: one line, not a traceback, and before any work
        engine_config, adapter_config, server_config = _serve_configs(args)
    except ValueError as exc:
        print(f"loraplex: {exc}", file=sys.stderr)
        return 2
    model_config = ModelConfig(model_dir=args.model, served_model_name=args.served_model_name,
                               cache_dir=args.cache_dir or default_model.default_cache_dir())
    if model_config.model_dir is None:
        model_path = default_model.ensure_default_model(model_config.cache_dir)
        default_name = default_model.DEFAULT_MODEL_NAME
    else:
        if not (model_config.model_dir / "config.json").is_file():
            print(f"loraplex: --model {model_config.model_dir} has no config.json", file=sys.stderr)
            return 2
        model_path = model_config.model_dir
        default_name = model_config.model_dir.resolve().name
    if args.adapter_dir is not None and not args.adapter_dir.is_dir():
        print(f"loraplex: --adapter-dir {args.adapter_dir} is not a directory", file=sys.stderr)
        return 2
    engine_config = dataclasses.replace(engine_config, model_path=str(model_path))

    from loraplex.kernels.vllm_plugin import select_lora_kernels

    select_lora_kernels(engine_config.lora_kernels, compiled_ops_cache=model_config.cache_dir)
    import uvloop

    uvloop.run(run(engine_config, adapter_config, server_config,
                   model_config.served_model_name or default_name))
    return 0


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and any fields passed as
    ``extra=`` (a request's ``request_id``, ``adapter``, ``outcome``, latencies ...)."""

    _standard = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        import json

        entry = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                 "message": record.getMessage()}
        entry.update({k: v for k, v in vars(record).items() if k not in self._standard})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextLogFormatter(logging.Formatter):
    """One line per record: control characters in the message (a client's path, a name) are
    escaped, so no request can forge a log line."""

    _escapes = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)}

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = record.message.translate(self._escapes)
        return super().formatMessage(record)


def configure_logging(level: str, log_format: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLogFormatter() if log_format == "json" else TextLogFormatter())
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler], force=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(getattr(args, "log_level", "info"), getattr(args, "log_format", "text"))
    if args.command == "serve":
        return serve(args)
    return importlib.import_module(COMMAND_MODULES[args.command]).run(args)


if __name__ == "__main__":
    sys.exit(main())
