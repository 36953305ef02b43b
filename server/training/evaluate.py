"""Held-out evaluation: completion loss (in transformers, where the adapter was trained), and
greedy generations (from the serving engine, ``engine_eval``) scored against the references
(exact match; per-field accuracy when the references are JSON objects)."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass

import torch

from .data import Example, Features, batches
from .model import collate, completion_loss

_JSON_OBJECT = re.compile(r"\{.*?\}", re.DOTALL)


@dataclass
class EvalResult:
    loss: float | None  # None: not measured (the structured-output variants share the plain ones' loss)
    num_generated: int
    exact_match: float
    field_accuracy: float | None  # None when references are not JSON objects
    parse_rate: float | None  # share of outputs holding a JSON object (JSON references only)
    samples: list[dict]  # a few (reference, prediction) pairs to read

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def mean_loss(causal_lm, features: list[Features], batch_size: int, pad_id: int, device) -> float:
    total, count = 0.0, 0
    for batch in batches(features, batch_size, rng=None):
        loss, n = completion_loss(causal_lm, collate(batch, pad_id, device))
        total += float(loss) * n
        count += n
    return total / max(count, 1)


def parse_object(text: str) -> dict | None:
    for match in _JSON_OBJECT.finditer(text):
        try:
            value = json.loads(match.group(0))
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return None


def _same(expected, actual) -> bool:
    if isinstance(expected, (int, float)) and not isinstance(expected, bool):
        try:
            return math.isclose(float(actual), float(expected), abs_tol=0.005)
        except (TypeError, ValueError):
            return False
    if isinstance(expected, str):
        return isinstance(actual, str) and actual.strip() == expected.strip()
    return actual == expected


def score(references: list[str], predictions: list[str]) -> tuple[float, float | None, float | None]:
    """(exact match, field accuracy, parse rate). JSON references are compared as objects."""
    parsed_refs = [parse_object(r) if r.lstrip().startswith("{") else None for r in references]
    if not references:
        return 0.0, None, None
    if all(parsed_refs):
        fields = correct_fields = exact = parsed = 0
        for ref, prediction in zip(parsed_refs, predictions):
            got = parse_object(prediction) or {}
            parsed += bool(got)
            hits = sum(_same(value, got.get(key)) for key, value in ref.items())
            fields += len(ref)
            correct_fields += hits
            exact += hits == len(ref) and set(got) == set(ref)
        n = len(references)
        return exact / n, correct_fields / fields, parsed / n
    exact = sum(r.strip() == p.strip() for r, p in zip(references, predictions))
    return exact / len(references), None, None


def evaluate(examples: list[Example], predictions: list[str], loss: float | None) -> EvalResult:
    """Score greedy ``predictions`` of the first ``len(predictions)`` examples."""
    chosen = examples[:len(predictions)]
    exact, field_accuracy, parse_rate = score([e.reference for e in chosen], predictions)
    samples = [{"reference": e.reference, "prediction": p} for e, p in zip(chosen[:5], predictions[:5])]
    return EvalResult(loss, len(chosen), exact, field_accuracy, parse_rate, samples)
