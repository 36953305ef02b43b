"""Fast CPU batched-LoRA ops.

Tokens are grouped by adapter slot once per engine step (:func:`build_plan`); every layer then
reuses that plan. No per-token weight gathering: each adapter's A/B is used in place by one
matmul per segment. Three kinds of segment, chosen once per step:

* run      -- a contiguous run of >= ``min_run`` tokens on one slot (a long prefill): views;
* group    -- one slot's other tokens, >= ``min_group`` of them: gathered rows, one matmul;
* batched  -- the remaining small groups (decode tokens of many adapters): padded to < ``min_group``
              rows each and done in one ``bmm`` against the gathered per-slot weights
              (S_small x R x H weights copied, never T x R x H).

The ops compute in the dtype of the weights they are given; :class:`ComputeWeights` keeps float32
copies of bf16/fp16 adapter weights for CPUs without native bf16 matmuls (3x faster there).

Tokens on slot -1 are never touched ("no adapter"; vLLM's stock CPU ops index the weights with
-1, which silently applies the last slot's adapter to them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .reference import NO_ADAPTER, as_3d

DEFAULT_MIN_RUN = 64
DEFAULT_MIN_GROUP = 8


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


def build_plan(token_slots: torch.Tensor, min_run: int = DEFAULT_MIN_RUN,
               min_group: int = DEFAULT_MIN_GROUP) -> LoraPlan:
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
        if len(tokens) >= min_group:
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
    x [T, H_in]; lora_a [S, R, H_in] (or [S, 1, R, H_in]); computed in lora_a's dtype.
    """
    lora_a = as_3d(lora_a)
    x = x.to(lora_a.dtype)
    for start, end, slot in plan.runs:
        y[start:end] = _scaled(torch.mm(x[start:end], lora_a[slot].t()), scale)
    for tokens, slot in plan.groups:
        y.index_copy_(0, tokens, _scaled(torch.mm(x.index_select(0, tokens), lora_a[slot].t()), scale).to(y.dtype))
    if plan.batch_slots is not None:
        groups = plan.batch_slots.shape[0]
        x_pad = x.index_select(0, plan.batch_gather).view(groups, plan.batch_rows, x.shape[1])   # [G, L, H]
        a_sel = lora_a.index_select(0, plan.batch_slots)                                          # [G, R, H]
        y_pad = torch.bmm(x_pad, a_sel.transpose(1, 2)).view(-1, lora_a.shape[1])                # [G*L, R]
        y.index_copy_(0, plan.batch_valid_tokens,
                      _scaled(y_pad.index_select(0, plan.batch_valid_pos), scale).to(y.dtype))


def _scaled(t: torch.Tensor, scale: float) -> torch.Tensor:
    return t if scale == 1.0 else t.mul_(scale)


def lora_expand(plan: LoraPlan, y: torch.Tensor, lora_b: torch.Tensor, out: torch.Tensor, offset: int,
                add_inputs: bool = True, workspace: "Workspace | None" = None) -> None:
    """Semantics (in place on ``out`` [T, >= offset + N]):
        out[t, offset:offset+N] (+)= y[t] @ lora_b[slot[t]].T   for every token with slot[t] >= 0
    y [T, R] (any float dtype); lora_b [S, N, R] (or [S, 1, N, R]); computed in lora_b's dtype.
    ``add_inputs=False`` overwrites the slice (zero for no-adapter tokens).

    Every segment writes its rows of one [T, N] delta buffer (zero elsewhere); the buffer is then
    added to ``out`` once, so a dtype conversion happens once per call, not once per segment.
    """
    lora_b = as_3d(lora_b)
    width = lora_b.shape[1]
    target = out[:, offset:offset + width]
    y = y.to(lora_b.dtype)
    delta = (workspace or Workspace()).zeros(plan.num_tokens, width, lora_b.dtype)                # [T, N]
    for start, end, slot in plan.runs:
        torch.mm(y[start:end], lora_b[slot].t(), out=delta[start:end])
    for tokens, slot in plan.groups:
        delta.index_copy_(0, tokens, torch.mm(y.index_select(0, tokens), lora_b[slot].t()))
    if plan.batch_slots is not None:
        groups = plan.batch_slots.shape[0]
        y_pad = y.index_select(0, plan.batch_gather).view(groups, plan.batch_rows, y.shape[1])    # [G, L, R]
        b_sel = lora_b.index_select(0, plan.batch_slots)                                          # [G, N, R]
        pad_delta = torch.bmm(y_pad, b_sel.transpose(1, 2)).view(-1, width)                       # [G*L, N]
        delta.index_copy_(0, plan.batch_valid_tokens, pad_delta.index_select(0, plan.batch_valid_pos))
    rows = target[: plan.num_tokens]
    if add_inputs:
        rows += delta
    else:
        rows.copy_(delta)


class Workspace:
    """One growing scratch buffer per dtype, reused call after call (no allocation once warm)."""

    def __init__(self) -> None:
        self._buffers: dict[torch.dtype, torch.Tensor] = {}

    def zeros(self, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        numel = rows * cols
        buffer = self._buffers.get(dtype)
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=dtype)
            self._buffers[dtype] = buffer
        return buffer[:numel].view(rows, cols).zero_()


class ComputeWeights:
    """Float32 copies of low-precision adapter weights, made once and reused until vLLM writes
    new weights into the slot buffers (detected by the tensor's in-place version counter)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._cache: dict[int, tuple[int, torch.Tensor, torch.Tensor]] = {}

    def __call__(self, weights: torch.Tensor) -> torch.Tensor:
        if not self.enabled or weights.dtype == torch.float32:
            return weights
        key = id(weights)
        hit = self._cache.get(key)
        if hit is not None and hit[0] == weights._version and hit[1] is weights:
            return hit[2]
        converted = weights.float()
        self._cache[key] = (weights._version, weights, converted)
        return converted


def native_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 / AMX); otherwise fp32 is faster."""
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())


def add_lora_linear(plan: LoraPlan, out: torch.Tensor, x: torch.Tensor, lora_a_slices, lora_b_slices,
                    scale: float, output_slices, offset_start: int = 0, workspace: Workspace | None = None) -> None:
    """Multi-slice form; same semantics as ``reference.add_lora_linear``.

    The shrink of a slice feeds its expand directly (one [T, R] float32 intermediate per slice).
    """
    if not plan.has_lora:
        return
    offset = offset_start
    x = x.to(lora_a_slices[0].dtype)  # once for all slices
    y = torch.empty(x.shape[0], as_3d(lora_a_slices[0]).shape[1], dtype=torch.float32)
    for lora_a, lora_b, width in zip(lora_a_slices, lora_b_slices, output_slices, strict=True):
        lora_shrink(plan, x, lora_a, y, scale)
        lora_expand(plan, y, lora_b, out, offset, workspace=workspace)
        offset += width
