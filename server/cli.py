"""``loraplex`` command line: the only place that reads argv and the environment.

Subcommands: ``serve`` (the server), ``train`` (fine-tune an adapter), ``loadtest`` (open-loop
load against a server).
Each builds its config dataclasses from flags.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

from .config import (
    LORA_KERNEL_CHOICES,
    AdapterConfig,
    AdmissionConfig,
    EngineConfig,
    LimitsConfig,
    ModelConfig,
    ServerConfig,
    TrainConfig,
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
    engine.add_argument("--max-loras", type=int, default=defaults_engine.max_loras,
                        help="adapters that can share one batch")
    engine.add_argument("--max-lora-rank", type=int, default=defaults_engine.max_lora_rank)
    engine.add_argument("--max-cpu-loras", type=int, default=defaults_engine.max_cpu_loras,
                        help="adapters kept loaded in the engine's CPU-side cache (LRU)")
    engine.add_argument("--lora-kernels", choices=LORA_KERNEL_CHOICES, default=defaults_engine.lora_kernels,
                        help="batched-LoRA ops: loraplex's own or vLLM's stock ones")
    engine.add_argument("--seed", type=int, default=defaults_engine.seed)
    engine.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True,
                        help="--no-enforce-eager: let vLLM capture CUDA graphs (GPU)")
    engine.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM: GPUs per model shard group")
    engine.add_argument("--pipeline-parallel-size", type=int, default=1, help="vLLM: pipeline stages")
    engine.add_argument("--data-parallel-size", type=int, default=1, help="vLLM: engine replicas in this server")
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
    server.add_argument("--max-prompt-tokens", type=int, default=None,
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
    admission.add_argument("--max-queue-wait", type=float, default=None,
                           help="seconds: 429 at once when the estimated queueing delay exceeds this")
    admission.add_argument("--adapter-weight", action="append", default=[], metavar="NAME=WEIGHT",
                           type=_adapter_weight, help="fair-share weight of an adapter (default 1; repeatable)")
    server.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    server.add_argument("--log-format", default="text", choices=("text", "json"), help="json: one object a line")


def _length_range(text: str) -> tuple[int, int]:
    """``128`` -> (128, 128); ``64:256`` -> (64, 256)."""
    low, _, high = text.partition(":")
    return int(low), int(high or low)


def _add_loadtest_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000",
                   help="an OpenAI-compatible server, or grpc://HOST:PORT for loraplex's gRPC API")
    p.add_argument("--rate", type=float, required=True, help="arrival rate, requests/s (open loop)")
    p.add_argument("--duration", type=float, default=30.0, help="measured seconds (after warm-up)")
    p.add_argument("--warmup", type=float, default=0.0, help="seconds of load excluded from results")
    p.add_argument("--burstiness", type=float, default=1.0, help="1 = Poisson; gamma shape otherwise")
    p.add_argument("--models", default=None, help="comma-separated models/adapters (default: all the server lists)")
    p.add_argument("--adapter-mix", default="uniform", help="uniform | zipf:ALPHA | weights:FILE.json")
    p.add_argument("--api", choices=("completions", "chat"), default="completions",
                   help="chat: each prompt is sent as one user message to /v1/chat/completions")
    p.add_argument("--concurrency", type=int, default=None,
                   help="closed loop: keep this many requests in flight (instead of --rate arrivals)")
    p.add_argument("--find-capacity", action="store_true",
                   help="bisect for the highest rate in [--rate-min, --rate] whose p99 meets the SLO")
    p.add_argument("--rate-min", type=float, default=0.25)
    p.add_argument("--search-steps", type=int, default=3)
    p.add_argument("--compare", default=None, metavar="URL",
                   help="run the identical workload against this second endpoint and print the ratios")
    p.add_argument("--prompt-len", type=_length_range, default=(128, 128), help="words: N or MIN:MAX")
    p.add_argument("--output-len", type=_length_range, default=(16, 16), help="tokens: N or MIN:MAX")
    p.add_argument("--prompts-file", type=Path, default=None, help='JSONL of {"prompt": ...}')
    p.add_argument("--slo", default="ttft=200ms", help="e.g. ttft=200ms,e2e=2s (judged on p99)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default=None)
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback target")
    p.add_argument("--out", type=Path, default=None, help="directory for result.json")
    p.add_argument("--churn-adapters", type=Path, nargs="*", default=(),
                   help="adapter directories to load/unload through the admin API while traffic runs")
    p.add_argument("--churn-interval", type=float, default=1.0, help="seconds between churn loads")
    p.add_argument("--admin-token", default=None, help="the server's admin token (needed for churn)")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    data = p.add_argument_group("data")
    data.add_argument("--data", type=Path, help="training JSONL: {prompt, completion} or {messages: [...]} per line")
    data.add_argument("--eval", type=Path, help="held-out JSONL in the same format")
    data.add_argument("--demo", action="store_true",
                      help="generate the demo task (loan statements -> payoff amount and due date as JSON), "
                           "train on it and evaluate base vs adapter")
    data.add_argument("--demo-train", type=int, default=320, help="demo training examples")
    data.add_argument("--demo-eval", type=int, default=200, help="demo held-out examples")
    data.add_argument("--replay", type=Path, help="general JSONL mixed in against forgetting")
    data.add_argument("--replay-ratio", type=float, default=None, help="share of replay examples, e.g. 0.1")
    p.add_argument("--out", type=Path, required=True, help="adapter directory to write (PEFT, safetensors)")
    p.add_argument("--model", type=Path, default=None, help="base model directory (default: embedded SmolLM2)")
    p.add_argument("--cache-dir", type=Path, default=None)
    hyper = p.add_argument_group("hyper-parameters (a preset fills them; flags override)")
    hyper.add_argument("--preset", default=None, help="preset name (default, demo) or JSON file; "
                       "default: 'demo' with --demo, else 'default'")
    hyper.add_argument("--rank", type=int)
    hyper.add_argument("--alpha", type=float)
    hyper.add_argument("--dropout", type=float)
    hyper.add_argument("--target-modules", nargs="+")
    hyper.add_argument("--lr", dest="learning_rate", type=float)
    hyper.add_argument("--epochs", type=float)
    hyper.add_argument("--batch-size", type=int)
    hyper.add_argument("--max-length", type=int)
    hyper.add_argument("--max-steps", type=int)
    hyper.add_argument("--seed", type=int)
    hyper.add_argument("--device", help="auto (cuda if present), cpu, cuda")
    evaluation = p.add_argument_group("evaluation")
    evaluation.add_argument("--eval-generate", type=int, help="eval examples to generate and score (default 200)")
    evaluation.add_argument("--eval-max-new-tokens", type=int)
    evaluation.add_argument("--no-compare-base", dest="compare_base", action="store_false", default=None,
                            help="skip evaluating the base model")
    serve = p.add_argument_group("hot-load when done")
    serve.add_argument("--serve-url", help="a running loraplex server, e.g. http://127.0.0.1:8000")
    serve.add_argument("--admin-token", help="that server's admin token")
    serve.add_argument("--adapter-name", help="name to load it under (default: the --out directory's name)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--log-level", default="info")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve_args(sub.add_parser("serve", help="serve the base model and its LoRA adapters"))
    _add_train_args(sub.add_parser("train", help="fine-tune a LoRA adapter (peft) and compare it with the base"))
    _add_loadtest_args(sub.add_parser("loadtest", help="open-loop load test of an OpenAI-compatible server"))
    return parser


def loadtest(args: argparse.Namespace) -> int:
    import httpx

    from loadtest.churn import ChurnConfig
    from loadtest.runner import (
        SLO,
        RunConfig,
        check_target,
        compare,
        num_requests_for,
        run_and_report,
    )
    from loadtest.workload import WorkloadConfig

    check_target(args.url, args.allow_remote)
    if args.models:
        models = tuple(m for m in args.models.split(",") if m)
    elif args.url.startswith("grpc://"):
        print("loraplex loadtest: a grpc:// target needs --models", file=sys.stderr)
        return 2
    elif args.adapter_mix.startswith("weights:"):
        from loadtest.workload import read_weights_file

        models = tuple(read_weights_file(Path(args.adapter_mix.split(":", 1)[1])))
    else:
        headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        models = tuple(m["id"] for m in httpx.get(f"{args.url}/v1/models", headers=headers).json()["data"])
    workload = WorkloadConfig(
        models=models, rate=args.rate, num_requests=num_requests_for(args.rate, args.duration, args.warmup),
        seed=args.seed, burstiness=args.burstiness, adapter_mix=args.adapter_mix, prompt_len=args.prompt_len,
        output_len=args.output_len, prompts_file=args.prompts_file, api=args.api)
    churn = None
    if args.churn_adapters:
        if not args.admin_token:
            print("loraplex loadtest: --churn-adapters needs --admin-token", file=sys.stderr)
            return 2
        churn = ChurnConfig(tuple(p.resolve() for p in args.churn_adapters), args.admin_token, args.churn_interval)
    config = RunConfig(url=args.url.rstrip("/"), workload=workload, duration_s=args.duration, warmup_s=args.warmup,
                       slo=SLO.parse(args.slo), api_key=args.api_key, allow_remote=args.allow_remote, churn=churn,
                       concurrency=args.concurrency)
    if args.find_capacity:
        return _find_capacity(args, config)
    result = run_and_report(config, args.out)
    if args.compare:
        check_target(args.compare, args.allow_remote)
        print(f"\n== same workload against {args.compare}")
        second = run_and_report(replace(config, url=args.compare.rstrip("/")),
                                args.out / "compare" if args.out else None)
        ratios = compare(result, second)
        if args.out:
            (args.out / "compare.json").write_text(json.dumps({"first": args.url, "second": args.compare,
                                                                "ratios": ratios}, indent=2))
    return 0 if result["completed"] else 1


def _find_capacity(args: argparse.Namespace, config) -> int:
    from loadtest.capacity import find_capacity
    from loadtest.plot import plot_latency_vs_rate
    from loadtest.runner import num_requests_for, run_and_report

    results = []

    def run_at(rate: float) -> bool:
        print(f"\n== rate {rate:g} req/s")
        workload = replace(config.workload, rate=rate, num_requests=num_requests_for(rate, args.duration, args.warmup))
        out = args.out / f"rate-{rate:g}" if args.out else None
        result = run_and_report(replace(config, workload=workload), out, plot=False)
        results.append(result)
        return result["slo_met"]

    found = find_capacity(run_at, args.rate_min, args.rate, args.search_steps)
    summary = {"capacity_rate": found.capacity_rate, "steps": found.steps, "slo": results[0]["slo"]}
    print(f"\ncapacity: {found.capacity_rate if found.capacity_rate is not None else 'below ' + str(args.rate_min)}"
          " req/s meets the SLO at p99")
    if args.out:
        (args.out / "capacity.json").write_text(json.dumps(summary, indent=2))
        plot_latency_vs_rate(results, args.out / "latency_vs_rate.png", results[0]["slo"]["ttft_ms"])
    return 0


def train(args: argparse.Namespace) -> int:
    from . import default_model
    from .training import presets, trainer
    from .training.data import DataError
    from .training.demo import write_demo_data

    if args.demo == (args.data is not None):
        print("loraplex train: give exactly one of --data FILE or --demo", file=sys.stderr)
        return 2
    try:
        values = presets.load_preset(args.preset or ("demo" if args.demo else "default"))
    except ValueError as exc:
        print(f"loraplex train: {exc}", file=sys.stderr)
        return 2
    overrides = {name: getattr(args, name) for name in (
        "rank", "alpha", "dropout", "learning_rate", "epochs", "batch_size", "max_length", "max_steps", "seed",
        "device", "replay_ratio", "eval_generate", "eval_max_new_tokens", "compare_base", "serve_url",
        "admin_token", "adapter_name") if getattr(args, name) is not None}
    if args.target_modules:
        overrides["target_modules"] = tuple(args.target_modules)
    train_path, eval_path = args.data, args.eval
    if args.demo:
        data_dir = args.out.with_name(args.out.name + "-data")
        train_path, eval_path = write_demo_data(data_dir, args.demo_train, args.demo_eval)
        print(f"demo data: {train_path} ({args.demo_train}), {eval_path} ({args.demo_eval})")
    cache_dir = args.cache_dir or default_model.default_cache_dir()
    try:
        config = TrainConfig(train_path=train_path, eval_path=eval_path, out_dir=args.out, model_dir=args.model,
                             cache_dir=cache_dir, replay_path=args.replay, **{**values, **overrides})
    except (TypeError, ValueError) as exc:
        print(f"loraplex train: {exc}", file=sys.stderr)
        return 2
    for path in (config.train_path, config.eval_path, config.replay_path):
        if path is not None and not path.is_file():
            print(f"loraplex train: {path} does not exist", file=sys.stderr)
            return 2
    model_dir = config.model_dir or default_model.ensure_default_model(cache_dir)
    try:
        report = trainer.train(config, model_dir, progress=not args.quiet)
    except DataError as exc:
        print(f"loraplex train: {exc}", file=sys.stderr)
        return 2
    print(trainer.summary_table(report))
    print(f"adapter: {config.out_dir}  (report: {config.out_dir / trainer.REPORT_NAME})")
    if config.serve_url:
        name = config.adapter_name or config.out_dir.resolve().name
        try:
            trainer.hot_load(config.serve_url, name, config.out_dir, config.admin_token)
        except Exception as exc:  # noqa: BLE001 - report any transport or server error and fail
            print(f"loraplex train: {exc}", file=sys.stderr)
            return 1
        print(f"hot-loaded as {name!r} into {config.serve_url}")
    return 0


def serve(args: argparse.Namespace) -> int:
    from . import default_model
    from .app import run

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
    engine_config = EngineConfig(
        model_path=str(model_path), dtype=args.dtype, max_model_len=args.max_model_len,
        kv_cache_gib=args.kv_cache_gib, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_loras=args.max_loras,
        max_lora_rank=args.max_lora_rank, max_cpu_loras=args.max_cpu_loras, lora_kernels=args.lora_kernels,
        seed=args.seed, enforce_eager=args.enforce_eager, tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size, data_parallel_size=args.data_parallel_size)
    for flag in ("api_key", "admin_token"):
        path = getattr(args, f"{flag}_file")
        if path is not None:
            try:
                setattr(args, flag, path.read_text().strip() or None)
            except OSError as exc:
                print(f"loraplex: --{flag.replace('_', '-')}-file: {exc}", file=sys.stderr)
                return 2
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

    from kernels.vllm_plugin import select_lora_kernels

    select_lora_kernels(engine_config.lora_kernels)
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
    if args.command == "train":
        return train(args)
    if args.command == "loadtest":
        return loadtest(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
