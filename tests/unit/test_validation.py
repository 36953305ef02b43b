"""Adapter directory validation, on hand-made files (no torch)."""

import json
import struct
from pathlib import Path

import pytest

from loraplex.server.adapters.validation import InvalidAdapter, inspect_adapter


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
    assert info.rank == 8 and info.target_modules == ("q_proj", "v_proj") and info.scale == 2.0


@pytest.mark.parametrize("config, message", [
    ({"r": 64}, "exceeds the server's max LoRA rank 16"),
    ({"r": 0}, "positive integer"),
    ({"peft_type": "IA3"}, "not supported"),
    ({"r": True}, "positive integer"),
    ({"lora_alpha": float("nan")}, "finite positive number"),
    ({"lora_alpha": float("inf")}, "finite positive number"),
    ({"lora_alpha": -8}, "finite positive number"),
    ({"lora_alpha": "16"}, "finite positive number"),
    ({"lora_alpha": 1e9}, "gives a scale of"),
    ({"alpha_pattern": {"q_proj": 1e9}}, "alpha_pattern"),
    ({"target_modules": [1, 2]}, "list of module names"),
    ({"target_modules": {"q_proj": 1}}, "list of module names or a regex string"),
    ({"target_modules": ["q_proj."]}, "list of module names"),
    ({"target_modules": "(q_proj"}, "not a valid regex"),
    ({"target_modules": "(" * 100_000}, "not a valid regex"),  # too deep for the parser; echoed in part
    ({"target_modules": "q_proj{4294967296}"}, "not a valid regex"),  # a repeat count too large
    ({"target_modules": ["q_proj\ud800"]}, "list of module names"),  # a lone surrogate
    ({"target_modules": ["q_proj\n", "v_proj"]}, "list of module names"),  # a control character
    ({"target_modules": [".q_proj"]}, "list of module names"),
])
def test_bad_configs(tmp_path, config, message):
    with pytest.raises(InvalidAdapter, match=message) as refused:
        inspect_adapter(make_dir(tmp_path, config), max_lora_rank=16)
    assert len(str(refused.value)) < 1000


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


def test_huge_or_non_utf8_config(tmp_path):
    d = make_dir(tmp_path)
    (d / "adapter_config.json").write_text('{"r": 8, "pad": "' + "x" * (2 << 20) + '"}')
    with pytest.raises(InvalidAdapter, match="larger than"):
        inspect_adapter(d, max_lora_rank=16)
    (d / "adapter_config.json").write_bytes(b'{"r": 8, "peft_type": "LORA\xff"}')
    with pytest.raises(InvalidAdapter, match="not valid JSON"):
        inspect_adapter(d, max_lora_rank=16)


def test_missing_config(tmp_path):
    d = make_dir(tmp_path)
    (d / "adapter_config.json").unlink()
    with pytest.raises(InvalidAdapter, match="adapter_config.json is missing"):
        inspect_adapter(d, max_lora_rank=16)


def _llama_dir(tmp_path: Path, targets, modules=("q_proj", "v_proj")) -> tuple[Path, object]:
    from loraplex.server.adapters.validation import BaseModelShapes

    base = BaseModelShapes.from_config({"hidden_size": 8, "num_attention_heads": 2, "num_key_value_heads": 1,
                                        "intermediate_size": 16, "num_hidden_layers": 2})
    d = make_dir(tmp_path, {"target_modules": targets})
    tensors = {}
    for layer in range(2):
        for module in modules:
            in_features, out_features = base.modules[module]
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = ([8, in_features], 4 * 8 * in_features)
            tensors[f"{prefix}.lora_B.weight"] = ([out_features, 8], 4 * 8 * out_features)
    write_safetensors(d / "adapter_model.safetensors", tensors)
    return d, base


@pytest.mark.parametrize("targets", [r".*\.(q_proj|v_proj)", "all-linear", ["self_attn.q_proj", "v_proj"],
                                     ["model.layers.0.self_attn.q_proj", "v_proj"]])
def test_peft_target_module_forms_are_read_from_the_weights(tmp_path, targets):
    """PEFT's target_modules may be a regex string, "all-linear" or dotted suffixes: accepted, and
    what is recorded is what the weights adapt (what vLLM loads), not the string."""
    d, base = _llama_dir(tmp_path, targets)
    info = inspect_adapter(d, max_lora_rank=16, base=base)
    assert info.target_modules == ("q_proj", "v_proj")


def test_listed_modules_the_base_model_lacks_are_refused(tmp_path):
    d, base = _llama_dir(tmp_path, ["self_attn.q_proj", "conv.proj_in"])
    with pytest.raises(InvalidAdapter, match=r"\['proj_in'\] are not linear layers"):
        inspect_adapter(d, max_lora_rank=16, base=base)


def test_rslora_scale(tmp_path):
    info = inspect_adapter(make_dir(tmp_path, {"r": 16, "lora_alpha": 8, "use_rslora": True}), max_lora_rank=16)
    assert info.scale == 2.0


def _save(directory: Path, tensors: dict) -> Path:
    from safetensors.torch import save_file

    save_file(tensors, str(directory / "adapter_model.safetensors"))
    return directory


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("which", ["lora_A", "lora_B"])
def test_check_weights_refuses_non_finite_values(tmp_path, poison, which):
    torch = pytest.importorskip("torch")
    from loraplex.server.adapters.validation import check_weights

    a, b = torch.ones(8, 4), torch.ones(4, 8)
    (a if which == "lora_A" else b)[1, 2] = poison
    d = _save(make_dir(tmp_path), {"m.layers.0.q_proj.lora_A.weight": a, "m.layers.0.q_proj.lora_B.weight": b})
    with pytest.raises(InvalidAdapter, match="NaN or Inf"):
        check_weights(d, 2.0, "float32")


def test_check_weights_refuses_what_overflows_once_folded_or_cast(tmp_path):
    torch = pytest.importorskip("torch")
    from loraplex.server.adapters.validation import check_weights

    b = torch.full((4, 8), 1e37)
    d = _save(make_dir(tmp_path), {"m.layers.0.q_proj.lora_B.weight": b})
    check_weights(d, 2.0, "float32")  # 2e37 fits
    with pytest.raises(InvalidAdapter, match="overflows float32"):
        check_weights(d, 100.0, "float32")  # 1e39 does not
    small = _save(make_dir(tmp_path / "f16") if (tmp_path / "f16").mkdir() is None else None,
                  {"m.layers.0.q_proj.lora_A.weight": torch.full((8, 4), 1e5)})
    check_weights(small, 1.0, "float32")
    with pytest.raises(InvalidAdapter, match="overflows float16"):
        check_weights(small, 1.0, "float16")
    # A float32 model with adapters stored in float16 (--lora-dtype): bounded by float16
    check_weights(small, 1.0, "float32", "bfloat16")
    with pytest.raises(InvalidAdapter, match="overflows float16"):
        check_weights(small, 1.0, "float32", "float16")
    ints = _save(make_dir(tmp_path / "int") if (tmp_path / "int").mkdir() is None else None,
                 {"m.layers.0.q_proj.lora_A.weight": torch.ones(8, 4, dtype=torch.int32)})
    with pytest.raises(InvalidAdapter, match="not floating point"):
        check_weights(ints, 1.0, "float32")
