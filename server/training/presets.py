"""Small preset files of training hyper-parameters (``presets/*.json``), in the spirit of
gpt-fast/nanoGPT configs: a preset fills a TrainConfig's fields, flags given on the command line
override it."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

PRESET_DIR = Path(__file__).with_name("presets")


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_preset(name_or_path: str) -> dict:
    """A preset by name (``demo``) or by path to a JSON file; keys must be TrainConfig fields."""
    from ..config import TrainConfig

    path = Path(name_or_path)
    if not path.is_file():
        path = PRESET_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise ValueError(f"no preset {name_or_path!r} (known: {', '.join(preset_names())}, or a JSON file)")
    values = json.loads(path.read_text())
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"preset {path}: unknown keys {sorted(unknown)}")
    if "target_modules" in values:
        values["target_modules"] = tuple(values["target_modules"])
    return values
