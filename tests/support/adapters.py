"""Test adapters made with peft on the embedded base model (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

from loraplex.loadtest.adapters import ALL_TARGETS, make_adapter  # noqa: F401  (re-exported for tests)


def load_base_model(model_dir: Path, dtype: str = "float32"):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))


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


def symlink_loop(path: Path) -> Path:
    """Make ``path`` one end of a two-link symlink loop (its twin beside it): resolving it never
    ends, and pathlib raises RuntimeError rather than OSError."""
    twin = path.with_name(f"{path.name}-twin")
    twin.symlink_to(path)
    path.symlink_to(twin)
    return path
