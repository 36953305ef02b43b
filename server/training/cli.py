"""``loraplex train``: its flags and what it runs (the server's command line only dispatches here)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..config import TrainConfig

HELP = """Fine-tune a LoRA adapter with peft on JSONL data ({"prompt","completion"} or {"messages"}),
evaluate base and adapter on held-out data through the serving engine (vLLM, with the task's JSON
schema as structured output too, when given), and write a directory the server can load.
Example: loraplex train --data train.jsonl --out adapters/triage   (or: loraplex train --demo --out demo)"""


def add_args(p: argparse.ArgumentParser) -> None:
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
    evaluation.add_argument("--eval-schema", type=Path,
                            help="a JSON schema of the answers: also evaluate base and adapter forced into it "
                                 "(structured outputs); --demo uses its own")
    serve = p.add_argument_group("hot-load when done")
    serve.add_argument("--serve-url", help="a running loraplex server, e.g. http://127.0.0.1:8000")
    serve.add_argument("--admin-token", help="that server's admin token")
    serve.add_argument("--adapter-name", help="name to load it under (default: the --out directory's name)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--log-level", default="info")


def run(args: argparse.Namespace) -> int:
    from .. import default_model
    from . import demo, presets, trainer
    from .data import DataError
    from .demo import write_demo_data

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
    if args.eval_schema is not None:  # checked now, not after training
        from ..errors import InvalidRequest
        from .engine_eval import checked_schema

        try:
            overrides["eval_schema"] = json.loads(args.eval_schema.read_text())
            checked_schema(overrides["eval_schema"])
        except (OSError, ValueError, InvalidRequest) as exc:
            print(f"loraplex train: --eval-schema {args.eval_schema}: {exc}", file=sys.stderr)
            return 2
    elif args.demo:
        overrides["eval_schema"] = demo.SCHEMA
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
