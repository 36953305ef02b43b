"""The request sequence of a run (no I/O beyond reading a prompts file): which model, prompt
and output length each request has, and when it is sent. Same seed, same sequence."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from .arrivals import send_times

WORDS = ("the", "a", "cat", "dog", "house", "river", "green", "fast", "loan", "payment", "date", "amount",
         "customer", "account", "ticket", "order", "ship", "blue", "small", "large", "city", "report")


@dataclass(frozen=True)
class RequestSpec:
    index: int
    send_at: float      # seconds from the start of the run
    model: str
    prompt: str
    max_tokens: int
    api: str = "completions"


@dataclass(frozen=True)
class WorkloadConfig:
    models: tuple[str, ...]            # base model and/or adapter names
    rate: float                        # requests/s (open loop)
    num_requests: int
    seed: int = 0
    burstiness: float = 1.0
    adapter_mix: str = "uniform"       # uniform | zipf:ALPHA
    prompt_len: tuple[int, int] = (128, 128)  # words, min..max (uniform)
    output_len: tuple[int, int] = (16, 16)
    prompts_file: Path | None = None   # JSONL with {"prompt": ...} per line
    api: str = "completions"           # completions | chat (the prompt becomes one user message)


def read_weights_file(path: Path) -> dict[str, float]:
    """``{"adapter-name": weight, ...}`` as JSON."""
    weights = json.loads(path.read_text())
    if not isinstance(weights, dict) or not weights or not all(
            isinstance(v, (int, float)) and v >= 0 for v in weights.values()):
        raise ValueError(f"{path}: expected a JSON object of model name -> non-negative weight")
    return {str(k): float(v) for k, v in weights.items()}


def model_weights(models: tuple[str, ...], adapter_mix: str) -> list[float]:
    """``uniform``, ``zipf:ALPHA`` (by position in ``models``) or ``weights:FILE.json``."""
    if adapter_mix == "uniform":
        return [1.0] * len(models)
    if adapter_mix.startswith("weights:"):
        weights = read_weights_file(Path(adapter_mix.split(":", 1)[1]))
        return [weights.get(m, 0.0) for m in models]
    if adapter_mix.startswith("zipf:"):
        alpha = float(adapter_mix.split(":", 1)[1])
        return [1.0 / (rank + 1) ** alpha for rank in range(len(models))]
    raise ValueError(f"adapter mix must be 'uniform', 'zipf:ALPHA' or 'weights:FILE', got {adapter_mix!r}")


def build_requests(config: WorkloadConfig) -> list[RequestSpec]:
    rng = random.Random(config.seed)
    weights = model_weights(config.models, config.adapter_mix)
    file_prompts = None
    if config.prompts_file is not None:
        file_prompts = [json.loads(line)["prompt"] for line in config.prompts_file.read_text().splitlines()
                        if line.strip()]
        if not file_prompts:
            raise ValueError(f"{config.prompts_file} holds no prompts")
    offsets = send_times(config.rate, config.num_requests, config.seed, config.burstiness)
    specs = []
    for i, send_at in enumerate(offsets):
        model = rng.choices(config.models, weights)[0]
        if file_prompts is not None:
            prompt = file_prompts[i % len(file_prompts)]
        else:
            length = rng.randint(*config.prompt_len)
            prompt = " ".join(rng.choice(WORDS) for _ in range(length))
        specs.append(RequestSpec(i, float(send_at), model, prompt, rng.randint(*config.output_len), config.api))
    return specs
