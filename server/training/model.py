"""The model side of training: load base + tokenizer, pad a batch, and the completion-only loss."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX, Features


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def load_base(model_dir: Path, device: torch.device):
    """Base model (fp32 on CPU; bf16 on a GPU that has it) and its tokenizer, pad token set."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    return model, tokenizer


def collate(batch: list[Features], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded input_ids [B, T], attention_mask [B, T], labels [B, T] (IGNORE_INDEX on pads)."""
    width = max(len(f.input_ids) for f in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, f in enumerate(batch):
        n = len(f.input_ids)
        input_ids[row, :n] = torch.tensor(f.input_ids)
        labels[row, :n] = torch.tensor(f.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device),
            "labels": labels.to(device)}


def completion_loss(causal_lm, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over completion tokens, and their count.

    The LM head runs only on positions whose next token is labelled: on a 135M model with a 49k
    vocabulary the head over every prompt position would cost as much as the whole decoder.
    """
    decoder = getattr(causal_lm, causal_lm.base_model_prefix)
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]  # [B, T-1]: position t predicts token t+1
    keep = targets != IGNORE_INDEX
    logits = causal_lm.get_output_embeddings()(hidden[:, :-1][keep])  # [N, V]
    count = int(keep.sum())
    return F.cross_entropy(logits.float(), targets[keep], reduction="mean"), count
