"""Fast CPU batched-LoRA ops.

Tokens are grouped by adapter slot once per engine step (:func:`build_plan`); every layer then
reuses that plan. No per-token weight gathering: each adapter's A/B is used in place by one
matmul per slot. The plan works in one of two index spaces:

* contiguous -- every slot's tokens already form one run (prefills, or one adapter): segments are
                views of the layer's own tensors, nothing is copied;
* sorted     -- otherwise the tokens that use an adapter are gathered once per call in slot order
                (``perm``), so each slot is again one contiguous segment, and results are scattered
                back once.

Segments shorter than ``min_group`` (decode tokens of many adapters) are padded into one ``bmm``
against the gathered per-slot weights (S_small x R x H weights copied, never T x R x H).

The ops compute in the dtype of the weights they are given; :class:`ComputeWeights` keeps float32
copies of bf16/fp16 adapter weights for CPUs without native bf16 matmuls (3x faster there).
Tokens on slot -1 are never touched ("no adapter"; vLLM's stock CPU ops index the weights with
-1, which silently applies the last slot's adapter to them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .reference import NO_ADAPTER, as_3d

DEFAULT_MIN_GROUP = 8


@dataclass
class LoraPlan:
    """How the tokens of one step map to adapter segments. Built once per step."""

    num_tokens: int
    # Rows of the plan's index space: T (contiguous) or the number of tokens with an adapter.
    num_rows: int = 0
    # Token index of each plan row (sorted space); None in contiguous space (row = token).
    perm: torch.Tensor | None = None
    # (start, end, slot) over plan rows, one matmul each
    segments: list[tuple[int, int, int]] = field(default_factory=list)
    # small segments padded into one bmm: gather index [G*L] into plan rows, valid positions and
    # the plan rows they fill, and the slot of each padded group [G]
    batch_gather: torch.Tensor | None = None
    batch_valid_pos: torch.Tensor | None = None
    batch_valid_rows: torch.Tensor | None = None
    batch_slots: torch.Tensor | None = None
    batch_rows: int = 0  # L, rows per padded group

    @property
    def has_lora(self) -> bool:
        return bool(self.segments or self.batch_slots is not None)


def build_plan(token_slots: torch.Tensor, min_group: int = DEFAULT_MIN_GROUP) -> LoraPlan:
    """Group the tokens of one step by adapter slot (``token_slots`` [T], -1 = no adapter)."""
    num_tokens = int(token_slots.shape[0])
    plan = LoraPlan(num_tokens=num_tokens, num_rows=num_tokens)
    if num_tokens == 0:
        return plan
    slots_cpu = token_slots.cpu()
    values, counts = torch.unique_consecutive(slots_cpu, return_counts=True)
    runs, start = [], 0
    for slot, count in zip(values.tolist(), counts.tolist()):
        if slot != NO_ADAPTER:
            runs.append((start, start + count, slot))
        start += count
    if len({slot for _, _, slot in runs}) < len(runs):
        # Some slot is split over several runs: work in slot-sorted order.
        lora_tokens = torch.nonzero(slots_cpu != NO_ADAPTER, as_tuple=False).flatten()
        order = torch.argsort(slots_cpu[lora_tokens], stable=True)
        plan.perm = lora_tokens[order]
        plan.num_rows = int(plan.perm.shape[0])
        sorted_values, sorted_counts = torch.unique_consecutive(slots_cpu[plan.perm], return_counts=True)
        runs, start = [], 0
        for slot, count in zip(sorted_values.tolist(), sorted_counts.tolist()):
            runs.append((start, start + count, slot))
            start += count
    small = []
    for start, end, slot in runs:
        (plan.segments if end - start >= min_group else small).append((start, end, slot))
    if small:
        rows = max(end - start for start, end, _ in small)
        gather, valid_pos, valid_rows = [], [], []
        for g, (start, end, _) in enumerate(small):
            members = list(range(start, end))
            gather.extend(members + [start] * (rows - len(members)))
            valid_pos.extend(range(g * rows, g * rows + len(members)))
            valid_rows.extend(members)
        plan.batch_gather = torch.tensor(gather, dtype=torch.long)
        plan.batch_valid_pos = torch.tensor(valid_pos, dtype=torch.long)
        plan.batch_valid_rows = torch.tensor(valid_rows, dtype=torch.long)
        plan.batch_slots = torch.tensor([slot for _, _, slot in small], dtype=torch.long)
        plan.batch_rows = rows
    return plan


def _to_plan_rows(plan: LoraPlan, t: torch.Tensor) -> torch.Tensor:
    """Token-indexed rows -> plan rows (a gather in sorted space, a view otherwise)."""
    return t if plan.perm is None else t.index_select(0, plan.perm)


def _rows_times_slot_weights(plan: LoraPlan, rows: torch.Tensor, weights: torch.Tensor,
                             out: torch.Tensor) -> None:
    """out[row] = rows[row] @ W[slot(row)].T for every plan row (others untouched); ``rows`` [P, K],
    ``weights`` [S, M, K], ``out`` [P, M]. One matmul per segment, one padded bmm for the small ones."""
    for start, end, slot in plan.segments:
        torch.mm(rows[start:end], weights[slot].t(), out=out[start:end])
    if plan.batch_slots is not None:
        groups = plan.batch_slots.shape[0]
        padded = rows.index_select(0, plan.batch_gather).view(groups, plan.batch_rows, rows.shape[1])  # [G, L, K]
        w_sel = weights.index_select(0, plan.batch_slots)                                              # [G, M, K]
        result = torch.bmm(padded, w_sel.transpose(1, 2)).view(-1, weights.shape[1])                  # [G*L, M]
        out.index_copy_(0, plan.batch_valid_rows, result.index_select(0, plan.batch_valid_pos))


def _shrink_rows(plan: LoraPlan, xs: torch.Tensor, lora_a: torch.Tensor, ys: torch.Tensor, scale: float) -> None:
    """ys[row] = scale * xs[row] @ A[slot(row)].T for every plan row; xs/ys in plan rows."""
    _rows_times_slot_weights(plan, xs, lora_a, ys)
    if scale != 1.0:
        ys.mul_(scale)


def _expand_rows(plan: LoraPlan, ys: torch.Tensor, lora_b: torch.Tensor, delta: torch.Tensor) -> None:
    """delta[row] = ys[row] @ B[slot(row)].T for every plan row (other rows stay zero)."""
    _rows_times_slot_weights(plan, ys, lora_b, delta)


def _apply_delta(plan: LoraPlan, delta: torch.Tensor, target: torch.Tensor, add_inputs: bool,
                 workspace: "Workspace") -> None:
    """target[t] (+)= delta of t's plan row; one dtype conversion for the whole call."""
    if plan.perm is not None:
        full = workspace.zeros(plan.num_tokens, delta.shape[1], delta.dtype, key="scatter")
        full.index_copy_(0, plan.perm, delta)
        delta = full
    rows = target[: plan.num_tokens]
    if add_inputs:
        rows += delta
    else:
        rows.copy_(delta)


def lora_shrink(plan: LoraPlan, x: torch.Tensor, lora_a: torch.Tensor, y: torch.Tensor, scale: float,
                workspace: "Workspace | None" = None) -> None:
    """Semantics (in place on ``y`` [T, R], rows of no-adapter tokens left as they are):
        y[t] = scale * x[t] @ lora_a[slot[t]].T     for every token with slot[t] >= 0
    x [T, H_in]; lora_a [S, R, H_in] (or [S, 1, R, H_in]); computed in lora_a's dtype.
    """
    if not plan.has_lora:
        return
    lora_a = as_3d(lora_a)
    xs = _to_plan_rows(plan, x.to(lora_a.dtype))
    if plan.perm is None and y.dtype == lora_a.dtype and y.is_contiguous():
        _shrink_rows(plan, xs, lora_a, y, scale)
        return
    ys = (workspace or Workspace()).zeros(plan.num_rows, lora_a.shape[1], lora_a.dtype, key="shrink")
    _shrink_rows(plan, xs, lora_a, ys, scale)
    if plan.perm is None:
        rows = torch.cat([torch.arange(s, e) for s, e, _ in plan.segments]
                         + ([plan.batch_valid_rows] if plan.batch_slots is not None else []))
        y.index_copy_(0, rows, ys.index_select(0, rows).to(y.dtype))
    else:
        y.index_copy_(0, plan.perm, ys.to(y.dtype))


def lora_expand(plan: LoraPlan, y: torch.Tensor, lora_b: torch.Tensor, out: torch.Tensor, offset: int,
                add_inputs: bool = True, workspace: "Workspace | None" = None) -> None:
    """Semantics (in place on ``out`` [T, >= offset + N]):
        out[t, offset:offset+N] (+)= y[t] @ lora_b[slot[t]].T   for every token with slot[t] >= 0
    y [T, R] (any float dtype); lora_b [S, N, R] (or [S, 1, N, R]); computed in lora_b's dtype.
    ``add_inputs=False`` overwrites the slice (zero for no-adapter tokens).
    """
    lora_b = as_3d(lora_b)
    width = lora_b.shape[1]
    target = out[:, offset:offset + width]
    if not plan.has_lora:
        if not add_inputs:
            target.zero_()
        return
    workspace = workspace or Workspace()
    ys = _to_plan_rows(plan, y.to(lora_b.dtype))
    delta = workspace.zeros(plan.num_rows, width, lora_b.dtype, key="delta")                   # [rows, N]
    _expand_rows(plan, ys, lora_b, delta)
    _apply_delta(plan, delta, target, add_inputs, workspace)


class Workspace:
    """Growing scratch buffers by (purpose, dtype), reused call after call (no allocation once warm)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def zeros(self, rows: int, cols: int, dtype: torch.dtype, key: str) -> torch.Tensor:
        numel = rows * cols
        buffer = self._buffers.get((key, dtype))
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=dtype)
            self._buffers[(key, dtype)] = buffer
        return buffer[:numel].view(rows, cols).zero_()


class PerTensorCache:
    """``fn(tensor)`` computed once per tensor and reused until the tensor is written in place
    (its version counter changes), as vLLM does when it loads new weights into a slot buffer.
    Holding the tensor keeps its ``id`` from being reused by another one."""

    def __init__(self, fn) -> None:
        self._fn = fn
        self._cache: dict[int, tuple[int, torch.Tensor, object]] = {}

    def __call__(self, tensor: torch.Tensor):
        hit = self._cache.get(id(tensor))
        if hit is not None and hit[0] == tensor._version and hit[1] is tensor:
            return hit[2]
        value = self._fn(tensor)
        self._cache[id(tensor)] = (tensor._version, tensor, value)
        return value


class ComputeWeights:
    """Float32 copies of low-precision adapter weights (for CPUs without native bf16 matmuls),
    made once per slot buffer and refreshed when vLLM writes new weights into it."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._copies = PerTensorCache(lambda weights: weights.float())

    def __call__(self, weights: torch.Tensor) -> torch.Tensor:
        if not self.enabled or weights.dtype == torch.float32:
            return weights
        return self._copies(weights)


def native_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 / AMX); otherwise fp32 is faster."""
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())


def add_lora_linear(plan: LoraPlan, out: torch.Tensor, x: torch.Tensor, lora_a_slices, lora_b_slices,
                    scale: float, output_slices, offset_start: int = 0, workspace: Workspace | None = None) -> None:
    """Multi-slice form; same semantics as ``reference.add_lora_linear``.

    The activations are moved into plan rows once for all slices; each slice's shrink feeds its
    expand directly in plan rows.
    """
    if not plan.has_lora:
        return
    workspace = workspace or Workspace()
    dtype = lora_a_slices[0].dtype
    xs = _to_plan_rows(plan, x.to(dtype))
    rank = as_3d(lora_a_slices[0]).shape[1]
    offset = offset_start
    for lora_a, lora_b, width in zip(lora_a_slices, lora_b_slices, output_slices, strict=True):
        ys = workspace.zeros(plan.num_rows, rank, dtype, key="shrink")
        _shrink_rows(plan, xs, as_3d(lora_a), ys, scale)
        delta = workspace.zeros(plan.num_rows, width, dtype, key="delta")
        _expand_rows(plan, ys, as_3d(lora_b), delta)
        _apply_delta(plan, delta, out[:, offset:offset + width], True, workspace)
        offset += width
