"""Pure-torch oracle for every batched-LoRA op. Slow and obvious on purpose: tests compare the
fast paths (``cpu_lora``, ``triton_lora``) against these.

Shapes (vLLM's stacked layout; a leading singleton layer dim ``[S, 1, ...]`` is accepted too):
    x            [T, H_in]      activations of T tokens
    lora_a       [S, R, H_in]   A of every adapter slot
    lora_b       [S, N, R]      B of every adapter slot (N = output width of this slice)
    token_slots  [T] int64      adapter slot of each token; -1 = no adapter
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

NO_ADAPTER = -1


def as_3d(weights: torch.Tensor) -> torch.Tensor:
    """[S, 1, A, B] (vLLM's per-layer stacking) -> [S, A, B]."""
    return weights.squeeze(1) if weights.ndim == 4 else weights


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, token_slots: torch.Tensor, scale: float) -> torch.Tensor:
    """Semantics:
        y[t] = scale * x[t] @ lora_a[token_slots[t]].T   if token_slots[t] >= 0
        y[t] = 0                                         otherwise
    Returns y [T, R] in float32.
    """
    lora_a = as_3d(lora_a)
    num_tokens, rank = x.shape[0], lora_a.shape[1]
    y = torch.zeros(num_tokens, rank, dtype=torch.float32)
    for t in range(num_tokens):
        slot = int(token_slots[t])
        if slot != NO_ADAPTER:
            y[t] = scale * (x[t].float() @ lora_a[slot].float().T)
    return y


def lora_expand(y: torch.Tensor, lora_b: torch.Tensor, token_slots: torch.Tensor, out: torch.Tensor,
                offset: int = 0, add_inputs: bool = True) -> torch.Tensor:
    """Semantics (in place on ``out`` [T, >= offset + N], returned):
        out[t, offset:offset+N] (+)= y[t] @ lora_b[token_slots[t]].T   if token_slots[t] >= 0
    With ``add_inputs=False`` the slice is overwritten (set to 0 for tokens without adapter).
    """
    lora_b = as_3d(lora_b)
    width = lora_b.shape[1]
    if not add_inputs:
        out[:, offset:offset + width] = 0
    for t in range(y.shape[0]):
        slot = int(token_slots[t])
        if slot != NO_ADAPTER:
            delta = y[t].float() @ lora_b[slot].float().T
            out[t, offset:offset + width] += delta.to(out.dtype)
    return out


def add_lora_linear(out: torch.Tensor, x: torch.Tensor, lora_a_slices: Sequence[torch.Tensor],
                    lora_b_slices: Sequence[torch.Tensor], token_slots: torch.Tensor, scale: float,
                    output_slices: Sequence[int], offset_start: int = 0) -> torch.Tensor:
    """Multi-slice LoRA (q/k/v or gate/up fused projections), in place on ``out``:
        offset = offset_start
        for i, width in enumerate(output_slices):
            out[:, offset:offset+width] += scale * x @ A_i[slot].T @ B_i[slot].T   (per token)
            offset += width
    """
    offset = offset_start
    for lora_a, lora_b, width in zip(lora_a_slices, lora_b_slices, output_slices, strict=True):
        y = lora_shrink(x, lora_a, token_slots, scale)
        lora_expand(y, lora_b, token_slots, out, offset)
        offset += width
    return out
