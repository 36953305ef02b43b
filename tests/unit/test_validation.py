"""Adapter directory validation, on hand-made files (no torch)."""

import json
import struct
from pathlib import Path

import pytest

from server.adapters.validation import InvalidAdapter, inspect_adapter


def write_safetensors(path: Path, tensors: dict[str, tuple[list[int], int]], truncate: int = 0) -> None:
    header, offset = {}, 0
    for name, (shape, nbytes) in tensors.items():
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    data = struct.pack("<Q", len(raw)) + raw + b"\0" * offset
    path.write_bytes(data[: len(data) - truncate] if truncate else data)


def make_dir(tmp_path: Path, config: dict | None = None, **kwargs) -> Path:
    d = tmp_path / "adapter"
    d.mkdir()
    cfg = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    cfg.update(config or {})
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    write_safetensors(d / "adapter_model.safetensors", {"a.lora_A.weight": ([8, 4], 128)}, **kwargs)
    return d


def test_good_adapter(tmp_path):
    info = inspect_adapter(make_dir(tmp_path), max_lora_rank=16)
    assert info.rank == 8 and info.target_modules == ("q_proj", "v_proj") and info.num_tensors == 1


@pytest.mark.parametrize("config, message", [
    ({"r": 64}, "exceeds the server's max LoRA rank 16"),
    ({"r": 0}, "positive integer"),
    ({"peft_type": "IA3"}, "not supported"),
])
def test_bad_configs(tmp_path, config, message):
    with pytest.raises(InvalidAdapter, match=message):
        inspect_adapter(make_dir(tmp_path, config), max_lora_rank=16)


def test_truncated_weights(tmp_path):
    with pytest.raises(InvalidAdapter, match="truncated"):
        inspect_adapter(make_dir(tmp_path, truncate=10), max_lora_rank=16)


def test_garbage_weights_and_pickle_only(tmp_path):
    d = make_dir(tmp_path)
    (d / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(InvalidAdapter, match="corrupt"):
        inspect_adapter(d, max_lora_rank=16)
    (d / "adapter_model.safetensors").unlink()
    (d / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(InvalidAdapter, match="pickle"):
        inspect_adapter(d, max_lora_rank=16)


def test_missing_config(tmp_path):
    d = make_dir(tmp_path)
    (d / "adapter_config.json").unlink()
    with pytest.raises(InvalidAdapter, match="adapter_config.json is missing"):
        inspect_adapter(d, max_lora_rank=16)
