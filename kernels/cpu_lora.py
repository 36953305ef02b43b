"""Fast CPU batched-LoRA ops.

Tokens are grouped by adapter slot once per engine step (:func:`build_plan`); every layer then
reuses that plan. No per-token weight gathering: each adapter's A/B is used in place by one
matmul per segment. Three kinds of segment, chosen once per step:

* run      -- a contiguous run of >= ``min_run`` tokens on one slot (a prefill): views, no copies;
* group    -- one slot's scattered tokens, >= ``min_run`` of them: gathered rows, one matmul;
* batched  -- the remaining small groups (decode tokens of many adapters): padded to < ``min_run``
              rows each and done in one ``bmm`` against the gathered per-slot weights
              (S_small x R x H weights copied, never T x R x H).

Tokens on slot -1 are never touched ("no adapter"; vLLM's stock CPU ops index the weights with
-1, which silently applies the last slot's adapter to them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .reference import NO_ADAPTER, as_3d

DEFAULT_MIN_RUN = 8


@dataclass
class LoraPlan:
    """How the tokens of one step map to adapter segments. Built once per step."""

    num_tokens: int
    # (start, end, slot): contiguous token ranges on one slot
    runs: list[tuple[int, int, int]] = field(default_factory=list)
    # (token_index [n], slot): scattered tokens of one slot
    groups: list[tuple[torch.Tensor, int]] = field(default_factory=list)
    # padded batch of small groups: gather index [G*L], valid positions / tokens, slots [G]
    batch_gather: torch.Tensor | None = None
    batch_valid_pos: torch.Tensor | None = None
    batch_valid_tokens: torch.Tensor | None = None
    batch_slots: torch.Tensor | None = None
    batch_rows: int = 0  # L, rows per padded group

    @property
    def has_lora(self) -> bool:
        return bool(self.runs or self.groups or self.batch_slots is not None)


def build_plan(token_slots: torch.Tensor, min_run: int = DEFAULT_MIN_RUN) -> LoraPlan:
    """Group the tokens of one step by adapter slot (``token_slots`` [T], -1 = no adapter)."""
    num_tokens = int(token_slots.shape[0])
    plan = LoraPlan(num_tokens=num_tokens)
    if num_tokens == 0:
        return plan
    values, counts = torch.unique_consecutive(token_slots.cpu(), return_counts=True)
    scattered: dict[int, list[int]] = {}
    start = 0
    for slot, count in zip(values.tolist(), counts.tolist()):
        end = start + count
        if slot != NO_ADAPTER:
            if count >= min_run:
                plan.runs.append((start, end, slot))
            else:
                scattered.setdefault(slot, []).extend(range(start, end))
        start = end
    small: list[tuple[list[int], int]] = []
    for slot, tokens in scattered.items():
        if len(tokens) >= min_run:
            plan.groups.append((torch.tensor(tokens, dtype=torch.long), slot))
        else:
            small.append((tokens, slot))
    if small:
        rows = max(len(tokens) for tokens, _ in small)
        gather, valid_pos, valid_tokens = [], [], []
        for g, (tokens, _) in enumerate(small):
            padded = tokens + [tokens[0]] * (rows - len(tokens))
            gather.extend(padded)
            valid_pos.extend(range(g * rows, g * rows + len(tokens)))
            valid_tokens.extend(tokens)
        plan.batch_gather = torch.tensor(gather, dtype=torch.long)
        plan.batch_valid_pos = torch.tensor(valid_pos, dtype=torch.long)
        plan.batch_valid_tokens = torch.tensor(valid_tokens, dtype=torch.long)
        plan.batch_slots = torch.tensor([slot for _, slot in small], dtype=torch.long)
        plan.batch_rows = rows
    return plan


def lora_shrink(plan: LoraPlan, x: torch.Tensor, lora_a: torch.Tensor, y: torch.Tensor, scale: float) -> None:
    """Semantics (in place on ``y`` [T, R], rows of no-adapter tokens left as they are):
        y[t] = scale * x[t] @ lora_a[slot[t]].T     for every token with slot[t] >= 0
    x [T, H_in]; lora_a [S, R, H_in] (or [S, 1, R, H_in]).
    """
    lora_a = as_3d(lora_a)
    for start, end, slot in plan.runs:
        y[start:end] = torch.mm(x[start:end], lora_a[slot].t()).mul_(scale)
    for tokens, slot in plan.groups:
        y.index_copy_(0, tokens, torch.mm(x.index_select(0, tokens), lora_a[slot].t()).mul_(scale).to(y.dtype))
    if plan.batch_slots is not None:
        groups = plan.batch_slots.shape[0]
        x_pad = x.index_select(0, plan.batch_gather).view(groups, plan.batch_rows, x.shape[1])   # [G, L, H]
        a_sel = lora_a.index_select(0, plan.batch_slots)                                          # [G, R, H]
        y_pad = torch.bmm(x_pad, a_sel.transpose(1, 2)).view(-1, lora_a.shape[1])                # [G*L, R]
        y.index_copy_(0, plan.batch_valid_tokens,
                      y_pad.index_select(0, plan.batch_valid_pos).mul_(scale).to(y.dtype))


def lora_expand(plan: LoraPlan, y: torch.Tensor, lora_b: torch.Tensor, out: torch.Tensor, offset: int,
                add_inputs: bool = True) -> None:
    """Semantics (in place on ``out`` [T, >= offset + N]):
        out[t, offset:offset+N] (+)= y[t] @ lora_b[slot[t]].T   for every token with slot[t] >= 0
    y [T, R] (any float dtype); lora_b [S, N, R] (or [S, 1, N, R]). ``add_inputs=False`` overwrites
    the slice (zero for no-adapter tokens).
    """
    lora_b = as_3d(lora_b)
    width = lora_b.shape[1]
    target = out[:, offset:offset + width]
    if not add_inputs:
        target.zero_()
    dtype = lora_b.dtype
    for start, end, slot in plan.runs:
        target[start:end].addmm_(y[start:end].to(dtype), lora_b[slot].t())
    for tokens, slot in plan.groups:
        target.index_add_(0, tokens, torch.mm(y.index_select(0, tokens).to(dtype), lora_b[slot].t()).to(out.dtype))
    if plan.batch_slots is not None:
        groups = plan.batch_slots.shape[0]
        y_pad = y.index_select(0, plan.batch_gather).to(dtype).view(groups, plan.batch_rows, y.shape[1])  # [G, L, R]
        b_sel = lora_b.index_select(0, plan.batch_slots)                                                   # [G, N, R]
        delta = torch.bmm(y_pad, b_sel.transpose(1, 2)).view(-1, width)                                    # [G*L, N]
        target.index_add_(0, plan.batch_valid_tokens, delta.index_select(0, plan.batch_valid_pos).to(out.dtype))


def add_lora_linear(plan: LoraPlan, out: torch.Tensor, x: torch.Tensor, lora_a_slices, lora_b_slices,
                    scale: float, output_slices, offset_start: int = 0) -> None:
    """Multi-slice form; same semantics as ``reference.add_lora_linear``.

    The shrink of a slice feeds its expand directly (one [T, R] float32 intermediate per slice).
    """
    if not plan.has_lora:
        return
    offset = offset_start
    y = torch.empty(x.shape[0], as_3d(lora_a_slices[0]).shape[1], dtype=torch.float32)
    for lora_a, lora_b, width in zip(lora_a_slices, lora_b_slices, output_slices, strict=True):
        lora_shrink(plan, x, lora_a, y, scale)
        lora_expand(plan, y, lora_b, out, offset)
        offset += width
