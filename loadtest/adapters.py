"""Synthetic PEFT LoRA adapters for benchmarks, load tests and tests (made locally with peft on
the base model; nothing downloaded). Non-zero, seed-distinct A and B, so each adapter really
changes the model's output."""

from __future__ import annotations

from pathlib import Path

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_adapter(base_model, out_dir: Path, *, seed: int, rank: int = 8,
                 targets: tuple[str, ...] | str = ALL_TARGETS, b_std: float = 0.1) -> Path:
    """Save an adapter to ``out_dir``; ``base_model`` (transformers) is left without LoRA layers.

    ``targets``: module names, or one string, which PEFT reads as a regex over full module names.

    ``b_std`` sets how strongly the adapter moves the model (PEFT's default B is zero, which
    would make every adapter equal to the base model).
    """
    import torch
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank,
                        target_modules=targets if isinstance(targets, str) else list(targets),
                        lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(base_model, config, adapter_name="default")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.copy_(torch.randn(param.shape, generator=generator) / param.shape[1] ** 0.5)
            elif "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * b_std)
    model.save_pretrained(out_dir, safe_serialization=True)
    model.unload()
    return out_dir


def make_adapters(model_dir: Path, out_root: Path, num_adapters: int, rank: int, prefix: str = "synthetic",
                  seed: int = 0, targets: tuple[str, ...] = ALL_TARGETS) -> list[Path]:
    """``num_adapters`` adapters under ``out_root`` (reused if already there)."""
    import torch
    from transformers import AutoModelForCausalLM

    # (adapters of other targets get their own names: "-qv" for q_proj and v_proj alone)
    suffix = "" if tuple(targets) == ALL_TARGETS else "-" + "".join(name.split("_")[0][0] for name in targets)
    paths = [out_root / f"{prefix}-r{rank}{suffix}-{i}" for i in range(num_adapters)]
    missing = [(i, p) for i, p in enumerate(paths) if not (p / "adapter_model.safetensors").is_file()]
    if missing:
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        for i, path in missing:
            make_adapter(base, path, seed=seed + i, rank=rank, targets=targets)
    return paths
