"""Test adapters made with peft on the embedded base model (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def load_base_model(model_dir: Path, dtype: str = "float32"):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))


def make_adapter(base_model, out_dir: Path, *, seed: int, rank: int = 8,
                 targets: tuple[str, ...] = ALL_TARGETS, b_std: float = 0.1) -> Path:
    """Save a PEFT LoRA adapter with non-zero, seed-distinct A and B to ``out_dir``.

    ``b_std`` sets how strongly the adapter moves the model (PEFT's default B is zero, which
    would make every adapter equal to the base model).
    """
    import torch
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), lora_dropout=0.0,
                        bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(base_model, config, adapter_name="default")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.copy_(torch.randn(param.shape, generator=generator) / param.shape[1] ** 0.5)
            elif "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * b_std)
    model.save_pretrained(out_dir, safe_serialization=True)
    model.unload()  # leaves base_model without LoRA layers for the next adapter
    return out_dir


def greedy_tokens(model, tokenizer, prompt: str, max_new_tokens: int) -> list[int]:
    import torch

    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return out[0, ids.shape[1]:].tolist()


def greedy_with_adapter(base_model, tokenizer, adapter_dir: Path, prompt: str, max_new_tokens: int) -> list[int]:
    from peft import PeftModel

    model = PeftModel.from_pretrained(base_model, adapter_dir)
    try:
        return greedy_tokens(model, tokenizer, prompt, max_new_tokens)
    finally:
        model.unload()
