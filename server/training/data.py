"""Training data: JSONL in one of two formats, tokenized with the loss on completion tokens only.

- ``{"prompt": "...", "completion": "..."}``: raw text, as ``/v1/completions`` sees it; the
  tokenizer's end-of-sequence token is appended to the completion so the model learns to stop.
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: chat, as ``/v1/chat/completions`` sees
  it; the prompt is every message but the last rendered with the model's chat template (with the
  generation prompt), the completion is the last (assistant) message as the template renders it.

Labels are ``-100`` on prompt tokens, so only completion tokens count towards the loss.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

IGNORE_INDEX = -100


class DataError(ValueError):
    """A training or evaluation file that cannot be used; the message names the line."""


@dataclass(frozen=True)
class Example:
    prompt: str  # the text the model is given (chat template already applied for chat data)
    completion: str  # the text it should produce (end-of-turn / end-of-sequence included)
    reference: str  # the answer alone, for exact-match scoring (no template tokens)
    messages: list[dict] | None = None  # the prompt messages, for chat data


@dataclass(frozen=True)
class Features:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt tokens


def _check_record(record: object, where: str) -> dict:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object")
    if "messages" in record:
        messages = record["messages"]
        if (not isinstance(messages, list) or len(messages) < 2
                or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                           and isinstance(m.get("content"), str) for m in messages)):
            raise DataError(f"{where}: 'messages' must be a list of at least two {{role, content}} objects")
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must be the assistant's (the completion)")
        return record
    if isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        return record
    raise DataError(f"{where}: need either 'messages' or string 'prompt' and 'completion'")


def read_records(path: Path) -> list[dict]:
    records = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not JSON ({exc.msg})") from exc
            records.append(_check_record(record, f"{path}:{number}"))
    if not records:
        raise DataError(f"{path}: no examples")
    return records


def to_example(record: dict, tokenizer) -> Example:
    if "messages" in record:
        messages = record["messages"]
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if not full.startswith(prompt):
            raise DataError("the chat template does not render the prompt as a prefix of the conversation")
        return Example(prompt, full[len(prompt):].rstrip("\n"), messages[-1]["content"], messages[:-1])
    eos = tokenizer.eos_token or ""
    return Example(record["prompt"], record["completion"] + eos, record["completion"])


def load_examples(path: Path, tokenizer) -> list[Example]:
    return [to_example(record, tokenizer) for record in read_records(path)]


def mix_replay(train: list[Example], replay: list[Example], ratio: float, seed: int) -> list[Example]:
    """Add replay examples so that they make up ``ratio`` of the result (sampled with repetition
    if the replay set is small), against forgetting the base model's general behaviour."""
    if not 0 <= ratio < 1:
        raise DataError("--replay-ratio must be in [0, 1)")
    if not replay or ratio == 0:
        return list(train)
    num_replay = round(len(train) * ratio / (1 - ratio))
    rng = random.Random(seed)
    return list(train) + [rng.choice(replay) for _ in range(num_replay)]


def tokenize(example: Example, tokenizer, max_length: int) -> Features:
    """Prompt tokens are labelled IGNORE_INDEX; the prompt is cut from the left if the pair is
    longer than ``max_length`` (the completion is what the loss is about)."""
    prompt_ids = tokenizer(example.prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(example.completion, add_special_tokens=False)["input_ids"]
    completion_ids = completion_ids[:max_length - 1]
    prompt_ids = prompt_ids[max(0, len(prompt_ids) + len(completion_ids) - max_length):]
    return Features(prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids)


def batches(features: list[Features], batch_size: int, rng: random.Random | None) -> list[list[Features]]:
    """Batches of similar length (less padding): shuffle, sort within windows of 16 batches,
    shuffle the batches. ``rng=None`` keeps the order (evaluation)."""
    order = list(range(len(features)))
    if rng is None:
        return [[features[i] for i in order[s:s + batch_size]] for s in range(0, len(order), batch_size)]
    rng.shuffle(order)
    window = batch_size * 16
    order = [i for s in range(0, len(order), window)
             for i in sorted(order[s:s + window], key=lambda i: len(features[i].input_ids))]
    grouped = [[features[i] for i in order[s:s + batch_size]] for s in range(0, len(order), batch_size)]
    rng.shuffle(grouped)
    return grouped
