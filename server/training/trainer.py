"""The training run, top to bottom: data -> base loss -> LoRA SFT -> save -> adapter loss ->
greedy evaluation of base and adapter (with and without the task's JSON schema) on the serving
engine -> report (-> hot-load into a running server)."""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..config import TrainConfig
from . import data as data_mod
from . import engine_eval
from .evaluate import evaluate, mean_loss
from .model import collate, completion_loss, load_base, pick_device

logger = logging.getLogger(__name__)
REPORT_NAME = "training_report.json"


def learning_rate_at(step: int, total_steps: int, peak: float, warmup_fraction: float) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    warmup = max(1, int(total_steps * warmup_fraction))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def _loss(model, tokenizer, config: TrainConfig, features, device) -> float:
    model.eval()
    return mean_loss(model, features, config.eval_batch_size, tokenizer.pad_token_id, device)


def _evaluate_on_engine(config: TrainConfig, model_dir: Path, tokenizer, examples, eval_losses: dict) -> dict:
    """Every variant's greedy generations from the serving engine, scored; plus how long it took."""
    chosen = examples[:config.eval_generate]
    wanted = engine_eval.variants(config.compare_base, config.eval_schema)
    prompts = [tokenizer.encode(e.prompt, add_special_tokens=False) for e in chosen]
    started = time.monotonic()
    predictions, served = engine_eval.generate(engine_eval.EvalEngineConfig(
        model_dir=model_dir, adapter_dir=config.out_dir, rank=config.rank, target_modules=config.target_modules,
        max_new_tokens=config.eval_max_new_tokens, max_model_len=config.max_length,
        compiled_ops_cache=config.cache_dir), prompts, wanted,
        config.eval_schema) if chosen else ({v.label: [] for v in wanted}, {})
    seconds = time.monotonic() - started
    results = {label: evaluate(chosen, texts, eval_losses.get(label)).as_dict() for label, texts in predictions.items()}
    for label, result in results.items():
        logger.info("%s: exact match %.1f%%", label, 100 * result["exact_match"])
    results["evaluation"] = {"engine": "vllm", **served, "seconds": round(seconds, 1),
                             "generations": len(chosen) * len(wanted)}
    return results


def train(config: TrainConfig, model_dir: Path, progress: bool = True) -> dict:
    """Train one adapter into ``config.out_dir`` and return the report (also written there)."""
    from peft import LoraConfig, get_peft_model
    from tqdm import tqdm

    _seed_everything(config.seed)
    device = pick_device(config.device)
    model, tokenizer = load_base(model_dir, device)

    train_examples = data_mod.load_examples(config.train_path, tokenizer)
    if config.replay_path is not None:
        replay = data_mod.load_examples(config.replay_path, tokenizer)
        train_examples = data_mod.mix_replay(train_examples, replay, config.replay_ratio, config.seed)
    train_features = [data_mod.tokenize(e, tokenizer, config.max_length) for e in train_examples]
    eval_examples = data_mod.load_examples(config.eval_path, tokenizer) if config.eval_path else []
    eval_features = [data_mod.tokenize(e, tokenizer, config.max_length) for e in eval_examples]

    report: dict = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()
                               if k != "admin_token"},
                    "base_model": str(model_dir), "device": str(device),
                    "num_train_examples": len(train_examples), "num_eval_examples": len(eval_examples)}
    eval_losses: dict[str, float] = {}
    if eval_examples and config.compare_base:
        eval_losses["base"] = _loss(model, tokenizer, config, eval_features, device)

    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                      target_modules=list(config.target_modules), bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    causal_lm = peft_model.get_base_model()  # the transformers model with LoRA layers inside
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)

    rng = random.Random(config.seed)
    steps_per_epoch = math.ceil(len(train_features) / config.batch_size)
    total_steps = max(1, math.ceil(steps_per_epoch * config.epochs))
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    losses: list[float] = []
    started = time.monotonic()
    peft_model.train()
    bar = tqdm(total=total_steps, desc="train", unit="step", disable=not progress)
    step = 0
    while step < total_steps:
        for batch in data_mod.batches(train_features, config.batch_size, rng):
            if step >= total_steps:
                break
            for group in optimizer.param_groups:
                group["lr"] = learning_rate_at(step, total_steps, config.learning_rate, config.warmup_fraction)
            loss, _ = completion_loss(causal_lm, collate(batch, tokenizer.pad_token_id, device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            losses.append(loss.detach().item())
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    train_seconds = time.monotonic() - started

    config.out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(config.out_dir, safe_serialization=True)
    window = max(1, min(10, len(losses) // 4))
    report["training"] = {"steps": total_steps, "seconds": round(train_seconds, 1),
                          "trainable_parameters": sum(p.numel() for p in trainable),
                          "loss_first": sum(losses[:window]) / window, "loss_last": sum(losses[-window:]) / window,
                          "losses": [round(x, 4) for x in losses]}
    logger.info("trained %d steps in %.0f s: loss %.3f -> %.3f", total_steps, train_seconds,
                report["training"]["loss_first"], report["training"]["loss_last"])
    if eval_examples:
        eval_losses["adapter"] = _loss(causal_lm, tokenizer, config, eval_features, device)
        del peft_model, causal_lm, model, optimizer  # the engine gets the memory
        report.update(_evaluate_on_engine(config, model_dir, tokenizer, eval_examples, eval_losses))
    (config.out_dir / REPORT_NAME).write_text(json.dumps(report, indent=2))
    return report


def hot_load(serve_url: str, adapter_name: str, adapter_dir: Path, admin_token: str | None) -> dict:
    """Load (or replace) the adapter in a running loraplex server through its admin API."""
    import httpx

    headers = {"authorization": f"Bearer {admin_token}"} if admin_token else {}
    response = httpx.post(f"{serve_url.rstrip('/')}/v1/load_lora_adapter", headers=headers, timeout=120,
                          json={"lora_name": adapter_name, "lora_path": str(adapter_dir.resolve())})
    if response.status_code != 200:
        raise RuntimeError(f"hot-load failed: HTTP {response.status_code}: {response.text}")
    return response.json()


def summary_table(report: dict) -> str:
    """Base vs adapter (each with the task's schema too, when there is one) on the held-out set."""
    columns = [label for label in ("base", "base+schema", "adapter", "adapter+schema") if label in report]

    def cell(result: dict, key: str, percent: bool) -> str:
        value = result.get(key)
        if value is None:
            return "-"
        return f"{100 * value:.1f}%" if percent else f"{value:.4f}"

    rows = [("", *columns)]
    for key, label, percent in (("loss", "eval loss", False), ("exact_match", "exact match", True),
                                ("field_accuracy", "field accuracy", True), ("parse_rate", "valid JSON", True)):
        rows.append((label, *(cell(report[c], key, percent) for c in columns)))
    training = report["training"]
    lines = [f"{row[0]:<16}" + "".join(f"{c:>16}" for c in row[1:]) for row in rows]
    if "evaluation" in report:
        evaluation = report["evaluation"]
        lines.append(f"evaluation: {evaluation['generations']} greedy generations on vLLM in "
                     f"{evaluation['seconds']:.0f} s")
    lines.append(f"training: {training['steps']} steps in {training['seconds']:.0f} s on {report['device']}, "
                 f"loss {training['loss_first']:.3f} -> {training['loss_last']:.3f}")
    return "\n".join(lines)
