"""Checks a PEFT LoRA adapter directory before anything reaches the engine.

:func:`inspect_adapter` needs no torch: the safetensors header is read directly (8-byte
little-endian length + JSON), which is enough to reject corrupt or truncated files and to read
tensor shapes. :func:`check_weights` then reads every tensor (torch, imported only there): all
finite, and finite once vLLM folds the scale into B in the served dtype and the dtype it stores
adapters in.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from .registry import AdapterError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
MAX_HEADER_BYTES = 100 << 20
MAX_CONFIG_BYTES = 1 << 20  # a PEFT adapter_config.json is a few hundred bytes
DEFAULT_MAX_ADAPTER_BYTES = 2 << 30
# lora_alpha / r (alpha / sqrt(r) with rsLoRA) above this is refused: no real adapter needs it,
# and a huge scale overflows once vLLM folds it into B.
MAX_LORA_SCALE = 1024.0
TENSOR_KEY = re.compile(r"layers\.(\d+)\..*?\.?(\w+)\.lora_([AB])\.weight$")
MODULE_NAME = re.compile(r"(\w+\.)*\w+")  # PEFT's target_modules entries: a name or a dotted suffix


class InvalidAdapter(AdapterError):
    status = 400


@dataclass(frozen=True)
class AdapterInfo:
    rank: int
    scale: float  # what vLLM multiplies B by: lora_alpha / r, or / sqrt(r) with rsLoRA
    target_modules: tuple[str, ...]


@dataclass(frozen=True)
class BaseModelShapes:
    """(in_features, out_features) of every LoRA-targetable linear of a Llama-style base model."""

    modules: dict[str, tuple[int, int]]
    num_layers: int

    @classmethod
    def from_config(cls, config: dict) -> "BaseModelShapes | None":
        try:
            hidden = int(config["hidden_size"])
            heads = int(config["num_attention_heads"])
            kv_heads = int(config.get("num_key_value_heads") or heads)
            head_dim = int(config.get("head_dim") or hidden // heads)
            intermediate = int(config["intermediate_size"])
            num_layers = int(config["num_hidden_layers"])
        except (KeyError, TypeError, ValueError):
            return None  # not a Llama-style config: the engine's own checks still apply
        return cls({
            "q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv_heads * head_dim),
            "v_proj": (hidden, kv_heads * head_dim), "o_proj": (heads * head_dim, hidden),
            "gate_proj": (hidden, intermediate), "up_proj": (hidden, intermediate),
            "down_proj": (intermediate, hidden),
        }, num_layers)

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> "BaseModelShapes | None":
        try:
            return cls.from_config(json.loads((model_dir / "config.json").read_text()))
        except (OSError, json.JSONDecodeError):
            return None


def is_adapter_dir(path: Path) -> bool:
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file()


def adapter_subdirs(adapter_dir: Path) -> list[Path]:
    """The adapters ``--adapter-dir`` serves: subdirectories holding an adapter, not hidden (a
    hidden name is a staging area), and not symlinks that leave the directory. Sorted by name."""
    root = adapter_dir.resolve()
    return sorted(p for p in adapter_dir.iterdir()
                  if is_adapter_dir(p) and p.resolve().is_relative_to(root) and not p.name.startswith("."))


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


def resolved_path(path: Path, error: type[Exception]) -> Path:
    """``path`` with symlinks followed; ``error`` (an AdapterError) where that cannot end (a symlink
    loop: pathlib raises RuntimeError) or the file system refuses."""
    try:
        return path.resolve()
    except (RuntimeError, OSError) as exc:
        raise error(f"{path.name!r} cannot be resolved (a symlink loop?): {exc}") from None


def resolve_inside(root: Path, name: str) -> Path:
    """``root/name`` with symlinks followed; refused if that leaves ``root`` (a link planted to
    read another file of the server's). Used on the operator's directory and again by the
    snapshot copy, which opens exactly the path returned."""
    resolved = resolved_path(root / name, InvalidAdapter)
    if not resolved.is_relative_to(resolved_path(root, InvalidAdapter)):
        raise InvalidAdapter(f"{name} is a symlink that leaves the adapter directory")
    return resolved


def _check_unsupported(config: dict) -> None:
    if config.get("use_dora"):
        raise InvalidAdapter("DoRA adapters (use_dora) are not supported")
    if config.get("bias", "none") not in (None, "none"):
        raise InvalidAdapter(f"LoRA bias={config['bias']!r} is not supported (only 'none')")
    if config.get("modules_to_save"):
        raise InvalidAdapter(f"modules_to_save {config['modules_to_save']} is not supported")


def _check_shapes(header: dict, rank: int, base: BaseModelShapes) -> None:
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        match = TENSOR_KEY.search(key)
        if match is None:
            raise InvalidAdapter(f"tensor {key!r} is not a LoRA A/B weight of a decoder layer")
        layer, module, which = int(match.group(1)), match.group(2), match.group(3)
        if module not in base.modules:
            raise InvalidAdapter(f"tensor {key!r} targets {module!r}, not a linear layer of the base model")
        if layer >= base.num_layers:
            raise InvalidAdapter(f"tensor {key!r} is for layer {layer}; the base model has {base.num_layers}")
        in_features, out_features = base.modules[module]
        expected = [rank, in_features] if which == "A" else [out_features, rank]
        if list(meta.get("shape", [])) != expected:
            raise InvalidAdapter(f"tensor {key!r} has shape {meta.get('shape')}; the base model needs {expected} "
                                 "(an adapter trained for another base model?)")


def inspect_adapter(path: Path, max_lora_rank: int, base: BaseModelShapes | None = None,
                    max_bytes: int = DEFAULT_MAX_ADAPTER_BYTES) -> AdapterInfo:
    """Validate ``path`` as a servable PEFT LoRA adapter and return what the registry records."""
    if not path.is_dir():
        raise InvalidAdapter(f"adapter path {str(path)!r} is not a directory")
    for name in PICKLE_WEIGHTS:
        if (path / name).exists() and not (path / ADAPTER_WEIGHTS).exists():
            raise InvalidAdapter(f"{name} is a pickle file; only safetensors adapters are accepted")
    config_path = resolve_inside(path, ADAPTER_CONFIG)
    resolve_inside(path, ADAPTER_WEIGHTS)
    if not config_path.is_file():
        raise InvalidAdapter(f"{ADAPTER_CONFIG} is missing in {path.name!r}")
    weights_path = path / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        raise InvalidAdapter(f"{ADAPTER_WEIGHTS} is missing in {path.name!r}")
    try:
        with config_path.open("rb") as f:  # read at most the bound: never a whole mistaken file
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise InvalidAdapter(f"{ADAPTER_CONFIG} is larger than {MAX_CONFIG_BYTES} bytes")
        config = json.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidAdapter(f"{ADAPTER_CONFIG} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise InvalidAdapter(f"{ADAPTER_CONFIG} must hold a JSON object")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise InvalidAdapter(f"peft_type {peft_type!r} is not supported (only LORA)")
    _check_unsupported(config)
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise InvalidAdapter(f"{ADAPTER_CONFIG}: 'r' must be a positive integer, got {rank!r}")
    if rank > max_lora_rank:
        raise InvalidAdapter(f"adapter rank {rank} exceeds the server's max LoRA rank {max_lora_rank}")
    scale = _scale(config, rank)
    named_modules = _named_target_modules(config.get("target_modules"), base)
    size = weights_path.stat().st_size
    if size > max_bytes:
        raise InvalidAdapter(f"{ADAPTER_WEIGHTS} is {size} bytes; the limit is {max_bytes}")
    header = read_safetensors_header(weights_path)
    num_tensors = sum(1 for key in header if key != "__metadata__")
    if num_tensors == 0:
        raise InvalidAdapter(f"{ADAPTER_WEIGHTS} holds no tensors")
    if base is not None:
        _check_shapes(header, rank, base)
    weight_modules = {match.group(2) for key in header if (match := TENSOR_KEY.search(key))}
    return AdapterInfo(rank=rank, scale=scale, target_modules=tuple(sorted(weight_modules or named_modules)))


def _named_target_modules(targets: object, base: BaseModelShapes | None) -> set[str]:
    """PEFT's ``target_modules``: a list of module names or dotted name suffixes (the last part
    is the module checked against the base model), or one string, which PEFT reads as a regex
    over full module names (or "all-linear") and which names no module by itself. What the
    adapter adapts is recorded from its weights' names, which is what vLLM loads."""
    if targets is None or targets == []:
        return set()
    if isinstance(targets, str):
        if targets != "all-linear":
            try:
                re.compile(targets)
            except (re.error, OverflowError, RecursionError) as exc:  # a huge repeat count, deep nesting
                raise InvalidAdapter(f"{ADAPTER_CONFIG}: 'target_modules' {targets[:200]!r} is not a valid "
                                     f"regex: {exc}") from exc
        return set()
    # Names are recorded and listed on both doors: dotted words only (no control characters, no
    # lone surrogates, which a protobuf string could not carry).
    if not isinstance(targets, list) or not all(isinstance(t, str) and MODULE_NAME.fullmatch(t) for t in targets):
        raise InvalidAdapter(f"{ADAPTER_CONFIG}: 'target_modules' must be a list of module names or a regex string")
    named = {t.rsplit(".", 1)[-1] for t in targets}
    if base is not None:
        unknown = sorted(named - set(base.modules))
        if unknown:
            raise InvalidAdapter(f"target modules {unknown} are not linear layers of the base model "
                                 f"(known: {sorted(base.modules)})")
    return named


def _scale(config: dict, rank: int) -> float:
    """lora_alpha must be a finite positive number, and the scale it gives bounded."""
    alpha = config.get("lora_alpha", rank)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise InvalidAdapter(f"{ADAPTER_CONFIG}: 'lora_alpha' must be a finite positive number, got {alpha!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise InvalidAdapter(f"{ADAPTER_CONFIG}: '{key}' (per-module ranks or alphas) is not supported")
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    if scale > MAX_LORA_SCALE:
        raise InvalidAdapter(f"{ADAPTER_CONFIG}: lora_alpha {alpha} gives a scale of {scale:g}; "
                             f"at most {MAX_LORA_SCALE:g} is accepted")
    return scale


def check_weights(path: Path, scale: float, served_dtype: str, adapter_dtype: str | None = None) -> None:
    """Every tensor floating point and finite, and finite in ``served_dtype`` and in
    ``adapter_dtype`` (the engine stores the weights in it; None: ``served_dtype``) -- B after
    vLLM multiplies it by ``scale`` too. (A NaN in one adapter must never reach the engine.)"""
    import torch
    from safetensors import SafetensorError, safe_open

    # The narrower of the two dtypes bounds the values
    limit, narrowest = min((torch.finfo(getattr(torch, name)).max, name)
                           for name in (served_dtype, adapter_dtype or served_dtype))
    try:
        with safe_open(str(path / ADAPTER_WEIGHTS), framework="pt") as weights:
            for key in weights.keys():  # noqa: SIM118 - safe_open has no __iter__
                tensor = weights.get_tensor(key)
                if not tensor.is_floating_point():
                    raise InvalidAdapter(f"tensor {key!r} is {tensor.dtype}, not floating point")
                largest = float(tensor.float().abs().max()) if tensor.numel() else 0.0
                if not math.isfinite(largest):
                    raise InvalidAdapter(f"tensor {key!r} holds NaN or Inf values")
                folded = largest * scale if ".lora_B." in key else largest
                if folded > limit:
                    raise InvalidAdapter(f"tensor {key!r} overflows {narrowest} (max |value| {largest:g}"
                                         + (f" x scale {scale:g})" if ".lora_B." in key else ")"))
    except SafetensorError as exc:
        raise InvalidAdapter(f"{ADAPTER_WEIGHTS} cannot be read: {exc}") from exc
