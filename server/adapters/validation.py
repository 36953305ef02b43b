"""Checks a PEFT LoRA adapter directory before anything reaches the engine.

No torch: the safetensors header is read directly (8-byte little-endian length + JSON), which is
enough to reject corrupt or truncated files and to read tensor shapes.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from .registry import AdapterError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
MAX_HEADER_BYTES = 100 << 20


class InvalidAdapter(AdapterError):
    status = 400


@dataclass(frozen=True)
class AdapterInfo:
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    base_model_name_or_path: str | None
    num_tensors: int


def is_adapter_dir(path: Path) -> bool:
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file()


def read_safetensors_header(path: Path) -> dict:
    size = path.stat().st_size
    with path.open("rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise InvalidAdapter(f"{path.name} is truncated (no header)")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise InvalidAdapter(f"{path.name} is corrupt or truncated (header length {header_len})")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidAdapter(f"{path.name} is corrupt: header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise InvalidAdapter(f"{path.name} is corrupt: header is not a JSON object")
    data_len = size - 8 - header_len
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        offsets = meta.get("data_offsets") if isinstance(meta, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and 0 <= offsets[0] <= offsets[1]):
            raise InvalidAdapter(f"{path.name} is corrupt: bad entry for tensor {key!r}")
        if offsets[1] > data_len:
            raise InvalidAdapter(f"{path.name} is truncated: tensor {key!r} ends past the end of the file")
    return header


def inspect_adapter(path: Path, max_lora_rank: int) -> AdapterInfo:
    """Validate ``path`` as a servable PEFT LoRA adapter and return what the registry records."""
    if not path.is_dir():
        raise InvalidAdapter(f"adapter path {str(path)!r} is not a directory")
    for name in PICKLE_WEIGHTS:
        if (path / name).exists() and not (path / ADAPTER_WEIGHTS).exists():
            raise InvalidAdapter(f"{name} is a pickle file; only safetensors adapters are accepted")
    config_path = path / ADAPTER_CONFIG
    if not config_path.is_file():
        raise InvalidAdapter(f"{ADAPTER_CONFIG} is missing in {path.name!r}")
    weights_path = path / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        raise InvalidAdapter(f"{ADAPTER_WEIGHTS} is missing in {path.name!r}")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidAdapter(f"{ADAPTER_CONFIG} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise InvalidAdapter(f"{ADAPTER_CONFIG} must hold a JSON object")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise InvalidAdapter(f"peft_type {peft_type!r} is not supported (only LORA)")
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise InvalidAdapter(f"{ADAPTER_CONFIG}: 'r' must be a positive integer, got {rank!r}")
    if rank > max_lora_rank:
        raise InvalidAdapter(f"adapter rank {rank} exceeds the server's max LoRA rank {max_lora_rank}")
    targets = config.get("target_modules") or ()
    if isinstance(targets, str):
        targets = (targets,)
    header = read_safetensors_header(weights_path)
    num_tensors = sum(1 for key in header if key != "__metadata__")
    if num_tensors == 0:
        raise InvalidAdapter(f"{ADAPTER_WEIGHTS} holds no tensors")
    return AdapterInfo(
        rank=rank,
        alpha=float(config.get("lora_alpha", rank)),
        target_modules=tuple(sorted(targets)),
        base_model_name_or_path=config.get("base_model_name_or_path"),
        num_tensors=num_tensors,
    )
