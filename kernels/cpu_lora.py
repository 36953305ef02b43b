"""Fast CPU batched-LoRA ops.

Tokens are grouped by adapter slot once per engine step (:func:`build_plan`); every layer then
reuses that plan. No per-token weight gathering: each adapter's A/B is used in place by one
matmul per segment of tokens. Two kinds of segment:

* direct   -- a run of at least ``min_direct_run`` consecutive tokens on one slot (a prefill, a
              long chunk): the matmuls read the layer's own rows and the expand adds straight
              into the output rows (``addmm_``), nothing is copied;
* gathered -- tokens of short runs (decode steps) are gathered once per call in slot order; a
              slot with at least ``min_group`` of them is one matmul, the rest are padded into
              one ``bmm`` (G slots x L rows); the results go back with one ``index_add_``.

Multi-slice projections (q/k/v, gate/up) shrink once against the slices' A matrices
concatenated along the rank (``fuse_slices``; the vLLM wrapper caches that per layer), and add
all slices' deltas in one pass.

The ops compute in the dtype of the weights they are given; :class:`ComputeWeights` keeps float32
copies of bf16/fp16 adapter weights for CPUs without native bf16 matmuls (3x faster there).
Tokens on slot -1 are never touched ("no adapter"; vLLM's stock CPU ops index the weights with
-1, which silently applies the last slot's adapter to them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .reference import NO_ADAPTER, as_3d

DEFAULT_MIN_GROUP = 8
DEFAULT_MIN_DIRECT_RUN = 32


@dataclass
class PaddedGroups:
    """Gathered rows ``[start, start + G*L)``: G groups of L rows, one slot each (slots with fewer
    than ``min_group`` short-run tokens share one ``bmm``). Rows past a slot's tokens pad its
    group: they repeat some gathered token, and their shrink result and delta are overwritten with
    zeros (not multiplied: 0 x NaN is NaN), so another slot's weights never reach a real token."""

    start: int
    rows: int                                     # L
    slots: torch.Tensor                           # [G]
    slots_are_prefix: bool                        # slots == arange(G): weights[:G], no copy
    padding_rows: torch.Tensor | None = None      # gathered rows that only pad (None: no padding)
    real_rows: torch.Tensor | None = None         # gathered rows holding a token (None: all of them)
    real_tokens: torch.Tensor | None = None       # their tokens

    @property
    def num_groups(self) -> int:
        return int(self.slots.shape[0])


@dataclass
class LoraPlan:
    """How the tokens of one step map to adapter segments. Built once per step."""

    num_tokens: int
    # The slots this step's tokens use, ascending (without -1)
    slots: tuple[int, ...] = ()
    # (start, end, slot) over token rows: long runs, used in place
    direct_segments: list[tuple[int, int, int]] = field(default_factory=list)
    # Token of each gathered row [W] (short runs, slot-sorted), None when there are none.
    gather: torch.Tensor | None = None
    # (start, end, slot) over gathered rows: slots with >= min_group short-run tokens
    gathered_segments: list[tuple[int, int, int]] = field(default_factory=list)
    # The rest of the gathered rows, padded into groups (None: no such slot)
    groups: PaddedGroups | None = None

    @property
    def has_lora(self) -> bool:
        return bool(self.direct_segments) or self.gather is not None

    @property
    def num_gathered(self) -> int:
        return 0 if self.gather is None else int(self.gather.shape[0])


def build_plan(token_slots: torch.Tensor, min_group: int = DEFAULT_MIN_GROUP,
               min_direct_run: int = DEFAULT_MIN_DIRECT_RUN) -> LoraPlan:
    """Group the tokens of one step by adapter slot (``token_slots`` [T], -1 = no adapter).
    Runs of at least ``min_direct_run`` tokens are used in place; the rest are gathered, and a
    slot with at least ``min_group`` gathered tokens gets its own matmul."""
    num_tokens = int(token_slots.shape[0])
    plan = LoraPlan(num_tokens=num_tokens)
    if num_tokens == 0:
        return plan
    values, counts = torch.unique_consecutive(token_slots.cpu(), return_counts=True)
    values = values.tolist()
    plan.slots = tuple(sorted(set(values) - {NO_ADAPTER}))
    short_tokens_per_slot: dict[int, list[int]] = {}
    start = 0
    for slot, count in zip(values, counts.tolist()):
        if slot == NO_ADAPTER:
            pass
        elif count >= min_direct_run:
            plan.direct_segments.append((start, start + count, slot))
        else:
            short_tokens_per_slot.setdefault(slot, []).extend(range(start, start + count))
        start += count
    if not short_tokens_per_slot:
        return plan

    gather: list[int] = []
    small: list[tuple[int, list[int]]] = []
    for slot in sorted(short_tokens_per_slot):
        tokens = short_tokens_per_slot[slot]
        if len(tokens) >= min_group:
            plan.gathered_segments.append((len(gather), len(gather) + len(tokens), slot))
            gather.extend(tokens)
        else:
            small.append((slot, tokens))
    if small:
        plan.groups = _padded_groups(_pad_to_slot_prefix(small), gather)
    plan.gather = torch.tensor(gather, dtype=torch.long)
    return plan


def _padded_groups(small: list[tuple[int, list[int]]], gather: list[int]) -> PaddedGroups:
    """Append the small slots' tokens to ``gather`` as equal groups (the last gathered rows) and
    describe them."""
    start, rows = len(gather), max(len(tokens) for _, tokens in small)
    padding: list[int] = []
    filler = next(tokens[0] for _, tokens in small if tokens)  # any token: padding rows add 0
    for _, tokens in small:
        padding.extend(range(len(gather) + len(tokens), len(gather) + rows))
        gather.extend(tokens + [filler] * (rows - len(tokens)))
    slots = [slot for slot, _ in small]
    groups = PaddedGroups(start=start, rows=rows, slots=torch.tensor(slots, dtype=torch.long),
                          slots_are_prefix=slots == list(range(len(slots))))
    if padding:
        groups.padding_rows = torch.tensor(padding, dtype=torch.long)
        is_real = torch.ones(len(gather), dtype=torch.bool)
        is_real[groups.padding_rows] = False
        groups.real_rows = torch.nonzero(is_real).flatten()
        groups.real_tokens = torch.tensor(gather, dtype=torch.long)[groups.real_rows]
    return groups


def _pad_to_slot_prefix(small: list[tuple[int, list[int]]]) -> list[tuple[int, list[int]]]:
    """Groups for slots 0..max_slot (empty ones for absent slots) when that at most doubles their
    number: the batched matmuls then take the weights ``[:G]`` as a view instead of copying them."""
    num_slots = max(slot for slot, _ in small) + 1
    if num_slots == len(small) or num_slots > 2 * len(small):
        return small
    tokens_of = dict(small)
    return [(slot, tokens_of.get(slot, [])) for slot in range(num_slots)]


class Workspace:
    """Growing scratch buffers by (purpose, dtype), reused call after call (no allocation once warm).
    Contents are left as they were: every op writes the rows it reads."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def empty(self, rows: int, cols: int, dtype: torch.dtype, key: str) -> torch.Tensor:
        numel = rows * cols
        buffer = self._buffers.get((key, dtype))
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=dtype)
            self._buffers[(key, dtype)] = buffer
        return buffer[:numel].view(rows, cols)


def _group_weights(groups: PaddedGroups, weights: torch.Tensor, workspace: Workspace) -> torch.Tensor:
    """The groups' slot weights [G, M, K]: a view when the groups are slots 0..G-1, else a copy
    into scratch space."""
    num_groups = groups.num_groups
    if groups.slots_are_prefix:
        return weights[:num_groups]
    copy = workspace.empty(num_groups, weights.shape[1] * weights.shape[2], weights.dtype, key="group-weights")
    return torch.index_select(weights, 0, groups.slots,
                              out=copy.view(num_groups, weights.shape[1], weights.shape[2]))


def _shrink(plan: LoraPlan, x: torch.Tensor, lora_a: torch.Tensor, scale: float,
            workspace: Workspace) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Semantics: y[t] = scale * x[t] @ lora_a[slot[t]].T, returned as (direct rows [T, R] valid on
    the direct segments, gathered rows [W, R]; padding rows 0). x [T, H]; lora_a [S, R, H]."""
    rank = lora_a.shape[1]
    lora_a_t = lora_a.transpose(1, 2)                                                                 # [S, H, R]
    y_direct = y_gathered = None
    if plan.direct_segments:
        y_direct = workspace.empty(plan.num_tokens, rank, lora_a.dtype, key="shrink-direct")
        for start, end, slot in plan.direct_segments:
            torch.mm(x[start:end], lora_a_t[slot], out=y_direct[start:end])
    if plan.gather is not None:
        x_gathered = torch.index_select(x, 0, plan.gather,
                                        out=workspace.empty(plan.num_gathered, x.shape[1], x.dtype, key="gather"))
        y_gathered = workspace.empty(plan.num_gathered, rank, lora_a.dtype, key="shrink-gathered")
        for start, end, slot in plan.gathered_segments:
            torch.mm(x_gathered[start:end], lora_a_t[slot], out=y_gathered[start:end])
        groups = plan.groups
        if groups is not None:
            shape = (groups.num_groups, groups.rows)
            rows = x_gathered[groups.start:].view(*shape, x.shape[1])                                 # [G, L, H]
            torch.bmm(rows, _group_weights(groups, lora_a_t, workspace),
                      out=y_gathered[groups.start:].view(*shape, rank))                               # [G, L, R]
            if groups.padding_rows is not None:
                y_gathered.index_fill_(0, groups.padding_rows, 0)
    if scale != 1.0:
        for y in (y_direct, y_gathered):
            if y is not None:
                y.mul_(scale)
    return y_direct, y_gathered


def _expand(plan: LoraPlan, y_direct: torch.Tensor | None, y_gathered: torch.Tensor | None,
            lora_b_slices: Sequence[torch.Tensor], rank_offsets: Sequence[int], target: torch.Tensor,
            workspace: Workspace) -> None:
    """Semantics, for every slice i (columns ``col_i:col_i+N_i`` of ``target`` [T, sum N_i]):
        target[t, col_i:col_i+N_i] += y[t, r_i:r_i+R_i] @ lora_b_i[slot[t]].T   for tokens with an adapter
    y_direct / y_gathered as :func:`_shrink` returns them; lora_b_i [S, N_i, R_i]."""
    same_dtype = target.dtype == lora_b_slices[0].dtype
    one_slice = len(lora_b_slices) == 1
    delta = None  # gathered rows' products [W, sum N], added back with one index_add_ at the end
    if plan.gather is not None:
        delta = workspace.empty(plan.num_gathered, target.shape[1], lora_b_slices[0].dtype, key="delta")
    col = 0
    for lora_b, rank_start in zip(lora_b_slices, rank_offsets):
        width, rank = lora_b.shape[1], lora_b.shape[2]
        lora_b_t = lora_b.transpose(1, 2)                                                           # [S, R, N]
        if plan.direct_segments:
            # Column views made once per slice, not per segment (each view costs a dispatch).
            target_cols = target if one_slice else target[:, col:col + width]
            y_cols = y_direct if one_slice else y_direct[:, rank_start:rank_start + rank]
            for start, end, slot in plan.direct_segments:
                if same_dtype:
                    target_cols[start:end].addmm_(y_cols[start:end], lora_b_t[slot])
                else:
                    target_cols[start:end] += torch.mm(y_cols[start:end], lora_b_t[slot])
        if delta is not None:
            y = y_gathered if one_slice else y_gathered[:, rank_start:rank_start + rank]
            delta_cols = delta if one_slice else delta[:, col:col + width]
            for start, end, slot in plan.gathered_segments:
                torch.mm(y[start:end], lora_b_t[slot], out=delta_cols[start:end])
            groups = plan.groups
            if groups is not None:
                shape = (groups.num_groups, groups.rows)
                y_groups = y[groups.start:].view(*shape, rank)                                       # [G, L, R]
                delta_groups = delta[groups.start:].view(*shape, -1)                                 # [G, L, sum N]
                weights = _group_weights(groups, lora_b_t, workspace)                               # [G, R, N]
                if one_slice:
                    torch.bmm(y_groups, weights, out=delta_groups)                                   # [G, L, N]
                else:  # a strided bmm output is slow: multiply into scratch, then copy into the columns
                    products = workspace.empty(shape[0] * shape[1], width, delta.dtype, key="products")
                    torch.bmm(y_groups, weights, out=products.view(*shape, width))
                    delta_groups[..., col:col + width].copy_(products.view(*shape, width))
        col += width
    if delta is not None:
        padding_rows = _padding_rows(plan)
        if padding_rows is not None:
            # A padding row multiplied its group slot's B by zeros; 0 x NaN (a bad adapter in that
            # slot) is NaN, and the row is added to a real token of another slot: overwrite it.
            delta.index_fill_(0, padding_rows, 0)
        target.index_add_(0, plan.gather, delta if same_dtype else delta.to(target.dtype))


def _padding_rows(plan: LoraPlan) -> torch.Tensor | None:
    return None if plan.groups is None else plan.groups.padding_rows


def fuse_slices(lora_a_slices: Sequence[torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
    """The slices' A matrices concatenated along the rank: [S, sum R_i, H] (one shrink for all
    slices). A single slice is returned as it is (no copy) when already in ``dtype``."""
    slices = [as_3d(a) for a in lora_a_slices]
    dtype = dtype or slices[0].dtype
    if len(slices) == 1:
        return slices[0].to(dtype)
    return torch.cat([a.to(dtype) for a in slices], dim=1)


def fused_slice_copies(lora_a_slices: Sequence[torch.Tensor], fused: torch.Tensor):
    """(part of ``fused``, slice) pairs: where each slice's A sits in :func:`fuse_slices`' result."""
    pairs, start = [], 0
    for a in lora_a_slices:
        a = as_3d(a)
        pairs.append((fused[:, start:start + a.shape[1]], a))
        start += a.shape[1]
    return pairs


def _token_rows(plan: LoraPlan, t: torch.Tensor) -> torch.Tensor:
    """The step's token rows of ``t`` (vLLM may hand over buffers with spare rows)."""
    return t if t.shape[0] == plan.num_tokens else t[: plan.num_tokens]


def add_lora_linear(plan: LoraPlan, out: torch.Tensor, x: torch.Tensor, lora_a_slices, lora_b_slices,
                    scale: float, output_slices, offset_start: int = 0, workspace: Workspace | None = None,
                    fused_lora_a: torch.Tensor | None = None) -> None:
    """Multi-slice form; same semantics as ``reference.add_lora_linear``:
        out[t, off_i:off_i+N_i] += scale * x[t] @ A_i[slot[t]].T @ B_i[slot[t]].T   (slot[t] >= 0)
    x [T, H]; A_i [S, R, H]; B_i [S, N_i, R]; ``fused_lora_a`` = ``fuse_slices(lora_a_slices)`` if
    the caller keeps it. Computed in the dtype of the weights.
    """
    if not plan.has_lora:
        return
    workspace = workspace or Workspace()
    lora_a = fused_lora_a if fused_lora_a is not None else fuse_slices(lora_a_slices)
    lora_b_slices = [as_3d(b) for b in lora_b_slices]
    rank_offsets, rank_start = [], 0
    for lora_b in lora_b_slices:
        rank_offsets.append(rank_start)
        rank_start += lora_b.shape[2]
    widths = sum(output_slices)
    if widths != sum(b.shape[1] for b in lora_b_slices):
        raise ValueError(f"output_slices {tuple(output_slices)} do not match the B widths")
    y_direct, y_gathered = _shrink(plan, _token_rows(plan, x).to(lora_a.dtype), lora_a, scale, workspace)
    target = _token_rows(plan, out)
    if offset_start or widths != target.shape[1]:
        target = target[:, offset_start:offset_start + widths]
    _expand(plan, y_direct, y_gathered, lora_b_slices, rank_offsets, target, workspace)


def lora_shrink(plan: LoraPlan, x: torch.Tensor, lora_a: torch.Tensor, y: torch.Tensor, scale: float,
                workspace: Workspace | None = None) -> None:
    """Semantics (in place on ``y`` [T, R], rows of no-adapter tokens left as they are):
        y[t] = scale * x[t] @ lora_a[slot[t]].T     for every token with slot[t] >= 0
    x [T, H_in]; lora_a [S, R, H_in] (or [S, 1, R, H_in]); computed in lora_a's dtype.
    """
    if not plan.has_lora:
        return
    lora_a = as_3d(lora_a)
    y_direct, y_gathered = _shrink(plan, _token_rows(plan, x).to(lora_a.dtype), lora_a, scale,
                                   workspace or Workspace())
    for start, end, _ in plan.direct_segments:
        y[start:end].copy_(y_direct[start:end])
    if y_gathered is not None:
        groups = plan.groups
        if groups is not None and groups.real_rows is not None:
            y.index_copy_(0, groups.real_tokens, y_gathered.index_select(0, groups.real_rows).to(y.dtype))
        else:
            y.index_copy_(0, plan.gather, y_gathered.to(y.dtype))


def lora_expand(plan: LoraPlan, y: torch.Tensor, lora_b: torch.Tensor, out: torch.Tensor, offset: int,
                add_inputs: bool = True, workspace: Workspace | None = None) -> None:
    """Semantics (in place on ``out`` [T, >= offset + N]):
        out[t, offset:offset+N] (+)= y[t] @ lora_b[slot[t]].T   for every token with slot[t] >= 0
    y [T, R] (any float dtype); lora_b [S, N, R] (or [S, 1, N, R]); computed in lora_b's dtype.
    ``add_inputs=False`` overwrites the slice (zero for no-adapter tokens).
    """
    lora_b = as_3d(lora_b)
    target = _token_rows(plan, out)[:, offset:offset + lora_b.shape[1]]
    if not add_inputs:
        target.zero_()
    if not plan.has_lora:
        return
    y = _token_rows(plan, y).to(lora_b.dtype)
    y_gathered = None
    if plan.gather is not None:
        y_gathered = y.index_select(0, plan.gather)
        padding_rows = _padding_rows(plan)
        if padding_rows is not None:
            y_gathered.index_fill_(0, padding_rows, 0)
    _expand(plan, y, y_gathered, [lora_b], [0], target, workspace or Workspace())


class PerTensorCache:
    """``fn(tensors)`` computed once per tensor (or tuple of tensors) and reused until one of them
    is written in place (its version counter changes), as vLLM does when it loads new weights
    into a slot buffer. Holding the tensors keeps their ``id`` from being reused by others.

    With ``slot_writes`` (``kernels/slot_writes.SlotWrites``), a write to some slots recomputes
    only those slots, in place: through ``copies(tensors, value)`` when given (pairs ``(dst,
    src)``, slot dimension first, such that ``dst[s].copy_(src[s])`` makes slot ``s`` current: one
    copy per pair, views made once), otherwise by ``fn`` on the written slots alone (``fn`` must
    then work slot by slot). A version change with no noted slot rebuilds everything."""

    MAX_ENTRIES = 4096  # a model's LoRA layers, several times over

    def __init__(self, fn, slot_writes=None, copies=None) -> None:
        self._fn = fn
        self._slot_writes = slot_writes
        self._copies = copies
        # id(tensors) -> [tensors, the tensors as a tuple, their versions, value, slot-write mark,
        #                 per slot: its (dst, src) views to copy (None: recompute with fn)]
        self._cache: dict[int, list] = {}

    def __call__(self, tensors):
        # Called per layer per step: keyed by the argument itself (vLLM passes the same tensor or
        # tuple every time), checked by identity and version counters.
        hit = self._cache.get(id(tensors))
        if hit is not None and hit[0] is tensors:
            if [t._version for t in hit[1]] == hit[2] or self._refresh_written_slots(hit):
                return hit[3]
        group = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)
        value = self._fn(tensors)
        if len(self._cache) >= self.MAX_ENTRIES:  # a caller passing a new container every time
            self._cache.clear()
        mark = per_slot = None
        if self._slot_writes is not None:
            mark = self._slot_writes.snapshot()
            if self._copies is not None:
                sources = {t.untyped_storage().data_ptr() for t in group}
                pairs = [(dst, src) for dst, src in self._copies(tensors, value)
                         if dst.untyped_storage().data_ptr() not in sources]  # a view of the buffer is current
                per_slot = [[(dst[slot], src[slot]) for dst, src in pairs] for slot in range(group[0].shape[0])]
        self._cache[id(tensors)] = [tensors, group, [t._version for t in group], value, mark, per_slot]
        return value

    def _refresh_written_slots(self, entry: list) -> bool:
        """Recompute, in place, the slots of ``entry`` written since it was made; False when
        that is not known (or not possible) and the whole value must be rebuilt."""
        if self._slot_writes is None:
            return False
        tensors, group, _, value, mark, per_slot = entry
        num_slots = group[0].shape[0]
        slots = [slot for slot in self._slot_writes.changed_since(mark) or () if slot < num_slots]
        if not slots or any(t.shape[0] != num_slots for t in group):
            return False
        if per_slot is not None:
            for slot in slots:
                for dst, src in per_slot[slot]:
                    dst.copy_(src)
        else:
            sources = {t.untyped_storage().data_ptr() for t in group}
            targets = [value] if isinstance(value, torch.Tensor) else list(value)
            for slot in slots:
                narrowed = tensors[slot:slot + 1] if isinstance(tensors, torch.Tensor) else type(tensors)(
                    t[slot:slot + 1] for t in tensors)
                fresh = self._fn(narrowed)
                for target, part in zip(targets, [fresh] if isinstance(fresh, torch.Tensor) else fresh, strict=True):
                    if target.untyped_storage().data_ptr() not in sources:  # a view of the buffer is current
                        target[slot:slot + 1].copy_(part)
        entry[2] = [t._version for t in group]
        entry[4] = self._slot_writes.snapshot()
        return True


class ComputeWeights:
    """Float32 copies of low-precision adapter weights (for CPUs without native bf16 matmuls),
    made once per slot buffer and refreshed when vLLM writes new weights into it."""

    def __init__(self, enabled: bool, slot_writes=None) -> None:
        self.enabled = enabled
        self._copies = PerTensorCache(lambda weights: weights.float(), slot_writes,
                                      copies=lambda weights, copy: [(copy, weights)])

    def __call__(self, weights: torch.Tensor) -> torch.Tensor:
        """``weights`` in the compute dtype (a cached copy, refreshed when they are rewritten)."""
        if not self.enabled or weights.dtype == torch.float32:
            return weights
        return self._copies(weights)


def native_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 / AMX); otherwise fp32 is faster."""
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
