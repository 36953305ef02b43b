"""Triton batched-LoRA ops for GPUs: segmented shrink (with split-K) and expand, several
slices (q/k/v, gate/up) fused into one launch. Correctness is tested on CPU under
``TRITON_INTERPRET=1`` (the interpreter runs them on torch CPU tensors); speed is only real on a GPU.

Segments follow Punica's convention: tokens are ordered by adapter slot once per step; segment
``g`` is the sorted rows ``[segment_starts[g], segment_starts[g + 1])``, all on slot
``segment_slots[g]``; tokens on slot -1 are in no segment and never touched. Two ways to build it:

* :func:`build_meta` -- only the slots present, exact launch sizes (reads counts back to the host);
* :class:`MetaBuffers` -- for CUDA graphs: one segment per slot (empty ones exit at once),
  preallocated at the maximum size and filled in place with no host sync; launch grids come from
  the step's token count (a shape, fixed inside a captured graph), never from data.

Split-K shrinks write each K split's partial sums to its own plane and add them in a second
kernel, in a fixed order: no atomics, so a replayed graph gives bit-identical results.

Tile sizes are data (``tile_configs.json``): per GPU, per op and rank bucket, with a default.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .reference import NO_ADAPTER, as_3d

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with torch/vLLM builds that need it
    triton = None
    tl = None

MAX_SLICES = 3

TILE_CONFIG_FILE = Path(__file__).with_name("tile_configs.json")
DEFAULT_DEVICE = "default"


@functools.lru_cache(maxsize=None)
def tile_tables() -> dict[str, dict[str, list[tuple[int | None, dict]]]]:
    """{device name: {op: [(max rank or None, config), ...]}} from ``tile_configs.json`` (data,
    not inline heuristics; one table per GPU, tuned on it, and a default)."""
    tables = json.loads(TILE_CONFIG_FILE.read_text())
    return {device: {op: [(bound, dict(config)) for bound, config in rows] for op, rows in ops.items()}
            for device, ops in tables.items() if not device.startswith("_")}


@functools.lru_cache(maxsize=None)
def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def tile_config(op: str, rank: int, device: str = DEFAULT_DEVICE) -> dict:
    """The tile config of ``op`` for ``rank`` on the GPU named ``device`` (its own table if it has
    one, else the default)."""
    tables = tile_tables()
    for max_rank, config in tables.get(device, tables[DEFAULT_DEVICE])[op]:
        if max_rank is None or rank <= max_rank:
            return dict(config)
    raise ValueError(f"no tile config for {op} rank {rank}")


def max_split_k(rank: int, device: str = DEFAULT_DEVICE) -> int:
    """Split-K planes the shrink of ``rank`` uses on ``device`` (to size preallocated partials)."""
    return tile_config("shrink", rank, device)["SPLIT_K"]


@dataclass
class TritonLoraMeta:
    """Tokens ordered by adapter slot; built once per step, used by every layer."""

    sorted_token_ids: torch.Tensor  # [L] int32, tokens with an adapter, grouped by slot
    segment_starts: torch.Tensor    # [G + 1] int32, s[0] = 0, s[-1] = L
    segment_slots: torch.Tensor     # [G] int32, the slot of each segment
    max_segment_len: int
    num_tokens: int

    @property
    def num_segments(self) -> int:
        return int(self.segment_slots.shape[0])


def build_meta(token_slots: torch.Tensor) -> TritonLoraMeta:
    """Group tokens by slot (``token_slots`` [T] int, -1 = no adapter)."""
    device = token_slots.device
    has_lora = token_slots != NO_ADAPTER
    lora_tokens = torch.nonzero(has_lora, as_tuple=False).flatten()
    slots = token_slots[lora_tokens]
    order = torch.argsort(slots, stable=True)
    sorted_tokens = lora_tokens[order]
    segment_slots, counts = torch.unique_consecutive(slots[order], return_counts=True)
    starts = torch.zeros(segment_slots.shape[0] + 1, dtype=torch.int32, device=device)
    starts[1:] = torch.cumsum(counts, 0)
    return TritonLoraMeta(
        sorted_token_ids=sorted_tokens.to(torch.int32),
        segment_starts=starts,
        segment_slots=segment_slots.to(torch.int32),
        max_segment_len=int(counts.max()) if counts.numel() else 0,
        num_tokens=int(token_slots.shape[0]),
    )


class MetaBuffers:
    """Per-step metadata at its maximum size, filled in place by :meth:`fill` (graph-safe: no host
    sync, no allocation). Segment ``g`` is slot ``g``; the tokens without an adapter sort first
    and lie before ``segment_starts[0]``."""

    def __init__(self, max_loras: int, max_num_tokens: int, device) -> None:
        self.max_loras, self.max_num_tokens = max_loras, max_num_tokens
        self.sorted_slots = torch.empty(max_num_tokens, dtype=torch.long, device=device)       # scratch
        self.order = torch.empty(max_num_tokens, dtype=torch.long, device=device)              # scratch
        self.sorted_token_ids = torch.empty(max_num_tokens, dtype=torch.int32, device=device)  # [T_max]
        self.ones = torch.ones(max_num_tokens, dtype=torch.long, device=device)
        self.slot_counts = torch.empty(max_loras + 1, dtype=torch.long, device=device)         # [-1, 0..S-1]
        self.cumulative = torch.empty(max_loras + 1, dtype=torch.long, device=device)
        self.segment_starts = torch.empty(max_loras + 1, dtype=torch.int32, device=device)     # [S + 1]
        self.segment_slots = torch.arange(max_loras, dtype=torch.int32, device=device)         # [S]

    def fill(self, token_slots: torch.Tensor) -> TritonLoraMeta:
        """Semantics: sort the step's tokens by slot (stable, no-adapter first); segment_starts[g] =
        #tokens with slot < g (no-adapter ones included). ``token_slots`` [T] int, on the device."""
        num_tokens = int(token_slots.shape[0])
        if num_tokens > self.max_num_tokens:
            raise ValueError(f"{num_tokens} tokens, buffers sized for {self.max_num_tokens}")
        sorted_slots, order = self.sorted_slots[:num_tokens], self.order[:num_tokens]
        torch.sort(token_slots.long(), stable=True, out=(sorted_slots, order))
        self.sorted_token_ids[:num_tokens].copy_(order)
        self.slot_counts.zero_()
        self.slot_counts.scatter_add_(0, sorted_slots.add_(1), self.ones[:num_tokens])  # slot -1 -> row 0
        torch.cumsum(self.slot_counts, 0, out=self.cumulative)
        self.segment_starts.copy_(self.cumulative)
        return TritonLoraMeta(sorted_token_ids=self.sorted_token_ids[:num_tokens], segment_starts=self.segment_starts,
                              segment_slots=self.segment_slots, max_segment_len=num_tokens, num_tokens=num_tokens)


if triton is not None:

    @triton.jit
    def _program_tile(segment_starts_ptr, num_n_tiles, NUM_SLICES: tl.constexpr):
        """This program's (segment, slice, token tile, column tile) and the segment's sorted rows
        [seg_start, seg_end): grid axis 0 = token tile x column tile, axis 2 = segment x slice."""
        pid_mn = tl.program_id(0)
        pid_gs = tl.program_id(2)
        segment = pid_gs // NUM_SLICES
        seg_start = tl.load(segment_starts_ptr + segment)
        seg_end = tl.load(segment_starts_ptr + segment + 1)
        return segment, pid_gs % NUM_SLICES, pid_mn // num_n_tiles, pid_mn % num_n_tiles, seg_start, seg_end

    @triton.jit
    def _tile_tokens(sorted_tokens_ptr, seg_start, seg_end, pid_m, BLOCK_M: tl.constexpr):
        """The token rows of token tile ``pid_m`` of a segment, and which of them exist."""
        offs_m = seg_start + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < seg_end
        return tl.load(sorted_tokens_ptr + offs_m, mask=mask_m, other=0).to(tl.int64), mask_m

    @triton.jit
    def _shrink_kernel(
        x_ptr, a0_ptr, a1_ptr, a2_ptr, y_ptr, partials_ptr,
        sorted_tokens_ptr, segment_starts_ptr, segment_slots_ptr,
        hidden, rank, scale, k_per_split,
        stride_xt, stride_xh,
        stride_as, stride_ar, stride_ah,
        stride_yslice, stride_yt, stride_yr,
        stride_pk, stride_pslice, stride_pt,
        num_n_tiles,
        NUM_SLICES: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    ):
        """One (segment, slice, token tile, rank tile, K split):
        y[slice, t, n] = scale * sum_k x[t, k] * A_slice[slot, n, k]  for t in the tile
        (with SPLIT_K > 1, this split's share of the sum goes to partials[split, slice, t, n])."""
        pid_k = tl.program_id(1)
        segment, slice_id, pid_m, pid_n, seg_start, seg_end = _program_tile(segment_starts_ptr, num_n_tiles,
                                                                            NUM_SLICES)
        if pid_m * BLOCK_M < seg_end - seg_start:
            slot = tl.load(segment_slots_ptr + segment).to(tl.int64)
            a_ptr = a0_ptr
            if slice_id == 1:
                a_ptr = a1_ptr
            if slice_id == 2:
                a_ptr = a2_ptr
            tokens, mask_m = _tile_tokens(sorted_tokens_ptr, seg_start, seg_end, pid_m, BLOCK_M)
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            mask_n = offs_n < rank
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            k_begin = pid_k * k_per_split
            for k0 in range(0, k_per_split, BLOCK_K):
                offs_k = k_begin + k0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < hidden
                x_tile = tl.load(x_ptr + tokens[:, None] * stride_xt + offs_k[None, :] * stride_xh,
                                 mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                a_tile = tl.load(a_ptr + slot * stride_as + offs_n[None, :] * stride_ar + offs_k[:, None] * stride_ah,
                                 mask=mask_n[None, :] & mask_k[:, None], other=0.0)
                acc += tl.dot(x_tile.to(tl.float32), a_tile.to(tl.float32))
            acc = acc * scale
            mask = mask_m[:, None] & mask_n[None, :]
            if SPLIT_K == 1:
                y_ptrs = y_ptr + slice_id * stride_yslice + tokens[:, None] * stride_yt + offs_n[None, :] * stride_yr
                tl.store(y_ptrs, acc, mask=mask)
            else:
                p_ptrs = (partials_ptr + pid_k * stride_pk + slice_id * stride_pslice + tokens[:, None] * stride_pt
                          + offs_n[None, :])
                tl.store(p_ptrs, acc, mask=mask)

    @triton.jit
    def _split_k_sum_kernel(
        partials_ptr, y_ptr,
        sorted_tokens_ptr, segment_starts_ptr,
        rank,
        stride_pk, stride_pslice, stride_pt,
        stride_yslice, stride_yt, stride_yr,
        num_n_tiles,
        NUM_SLICES: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """y[slice, t, n] = sum over k of partials[k, slice, t, n], k in order, for the segment's tokens."""
        _, slice_id, pid_m, pid_n, seg_start, seg_end = _program_tile(segment_starts_ptr, num_n_tiles, NUM_SLICES)
        if pid_m * BLOCK_M < seg_end - seg_start:
            tokens, mask_m = _tile_tokens(sorted_tokens_ptr, seg_start, seg_end, pid_m, BLOCK_M)
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            mask = mask_m[:, None] & (offs_n < rank)[None, :]
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k in range(SPLIT_K):
                acc += tl.load(partials_ptr + k * stride_pk + slice_id * stride_pslice + tokens[:, None] * stride_pt
                               + offs_n[None, :], mask=mask, other=0.0)
            tl.store(y_ptr + slice_id * stride_yslice + tokens[:, None] * stride_yt + offs_n[None, :] * stride_yr,
                     acc, mask=mask)

    @triton.jit
    def _expand_kernel(
        y_ptr, b0_ptr, b1_ptr, b2_ptr, out_ptr,
        sorted_tokens_ptr, segment_starts_ptr, segment_slots_ptr,
        rank, width0, width1, width2, offset0, offset1, offset2,
        stride_yslice, stride_yt, stride_yr,
        stride_b0s, stride_b1s, stride_b2s, stride_bn, stride_br,
        stride_ot, stride_on,
        num_n_tiles,
        NUM_SLICES: tl.constexpr, ADD_INPUTS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """One (segment, slice, token tile, output tile):
        out[t, off_s + n] (+)= sum_r y[slice, t, r] * B_slice[slot, n, r]  for t in the tile."""
        segment, slice_id, pid_m, pid_n, seg_start, seg_end = _program_tile(segment_starts_ptr, num_n_tiles,
                                                                            NUM_SLICES)
        b_ptr = b0_ptr
        width = width0
        offset = offset0
        stride_bs = stride_b0s
        if slice_id == 1:
            b_ptr = b1_ptr
            width = width1
            offset = offset1
            stride_bs = stride_b1s
        if slice_id == 2:
            b_ptr = b2_ptr
            width = width2
            offset = offset2
            stride_bs = stride_b2s
        if (pid_m * BLOCK_M < seg_end - seg_start) and (pid_n * BLOCK_N < width):
            slot = tl.load(segment_slots_ptr + segment).to(tl.int64)
            tokens, mask_m = _tile_tokens(sorted_tokens_ptr, seg_start, seg_end, pid_m, BLOCK_M)
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            mask_n = offs_n < width
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, rank, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < rank
                y_tile = tl.load(y_ptr + slice_id * stride_yslice + tokens[:, None] * stride_yt
                                 + offs_k[None, :] * stride_yr, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                b_tile = tl.load(b_ptr + slot * stride_bs + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_br,
                                 mask=mask_n[None, :] & mask_k[:, None], other=0.0)
                acc += tl.dot(y_tile.to(tl.float32), b_tile.to(tl.float32))
            out_ptrs = out_ptr + tokens[:, None] * stride_ot + (offset + offs_n)[None, :] * stride_on
            mask = mask_m[:, None] & mask_n[None, :]
            if ADD_INPUTS:
                acc += tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _padded(items: list, fill) -> list:
    return items + [fill] * (MAX_SLICES - len(items))


def lora_shrink(meta: TritonLoraMeta, x: torch.Tensor, lora_a_slices, y: torch.Tensor, scale: float,
                partials: torch.Tensor | None = None) -> None:
    """Semantics (in place on ``y`` [num_slices, T, R] float32; no-adapter rows untouched):
        for s, A in enumerate(lora_a_slices):
            y[s, t] = scale * x[t] @ A[slot[t]].T      for every token t with slot[t] >= 0
    x [T, H_in]; each A [S, R, H_in] (or [S, 1, R, H_in]), all slices of one shape. ``partials``
    (float32, at least [SPLIT_K, num_slices, T, R], contiguous rows): scratch for split-K, made
    here when not given.
    """
    if meta.num_segments == 0:
        return
    slices = [as_3d(a) for a in lora_a_slices]
    if not 1 <= len(slices) <= MAX_SLICES:
        raise ValueError(f"1 to {MAX_SLICES} slices are fused, got {len(slices)}")
    num_slots, rank, hidden = slices[0].shape
    config = tile_config("shrink", rank, device_name(x.device))
    split_k = config.pop("SPLIT_K")
    num_tokens = x.shape[0]
    if split_k > 1:
        if partials is None:
            partials = torch.empty(split_k, len(slices), num_tokens, rank, dtype=torch.float32, device=x.device)
        partials = partials[:split_k, :len(slices), :num_tokens, :rank]
    else:
        partials = y  # unused
    num_n_tiles = triton.cdiv(rank, config["BLOCK_N"])
    grid = (triton.cdiv(meta.max_segment_len, config["BLOCK_M"]) * num_n_tiles, split_k,
            meta.num_segments * len(slices))
    a = _padded(slices, slices[0])
    k_per_split = triton.cdiv(triton.cdiv(hidden, split_k), config["BLOCK_K"]) * config["BLOCK_K"]
    _shrink_kernel[grid](
        x, a[0], a[1], a[2], y, partials,
        meta.sorted_token_ids, meta.segment_starts, meta.segment_slots,
        hidden, rank, scale, k_per_split,
        x.stride(0), x.stride(1),
        slices[0].stride(0), slices[0].stride(1), slices[0].stride(2),
        y.stride(0), y.stride(1), y.stride(2),
        partials.stride(0), partials.stride(1), partials.stride(2),
        num_n_tiles,
        NUM_SLICES=len(slices), SPLIT_K=split_k, **config)
    if split_k > 1:
        _split_k_sum_kernel[(grid[0], 1, grid[2])](
            partials, y, meta.sorted_token_ids, meta.segment_starts, rank,
            partials.stride(0), partials.stride(1), partials.stride(2),
            y.stride(0), y.stride(1), y.stride(2),
            num_n_tiles,
            NUM_SLICES=len(slices), SPLIT_K=split_k, BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"])


def lora_expand(meta: TritonLoraMeta, y: torch.Tensor, lora_b_slices, out: torch.Tensor, output_slices,
                offset_start: int = 0, add_inputs: bool = True) -> None:
    """Semantics (in place on ``out`` [T, >= offset_start + sum(widths)]):
        offset = offset_start
        for s, (B, width) in enumerate(zip(lora_b_slices, output_slices)):
            out[t, offset:offset+width] (+)= y[s, t] @ B[slot[t]].T   for every token with slot[t] >= 0
            offset += width
    y [num_slices, T, R]; each B [S, width, R] (or [S, 1, width, R]).
    """
    if meta.num_segments == 0:
        return
    slices = [as_3d(b) for b in lora_b_slices]
    if not 1 <= len(slices) <= MAX_SLICES:
        raise ValueError(f"1 to {MAX_SLICES} slices are fused, got {len(slices)}")
    rank = slices[0].shape[2]
    widths = [int(w) for w in output_slices]
    offsets, offset = [], offset_start
    for w in widths:
        offsets.append(offset)
        offset += w
    config = tile_config("expand", rank, device_name(out.device))
    num_n_tiles = triton.cdiv(max(widths), config["BLOCK_N"])
    grid = (triton.cdiv(meta.max_segment_len, config["BLOCK_M"]) * num_n_tiles, 1, meta.num_segments * len(slices))
    b = _padded(slices, slices[0])
    w = _padded(widths, 0)
    o = _padded(offsets, 0)
    _expand_kernel[grid](
        y, b[0], b[1], b[2], out,
        meta.sorted_token_ids, meta.segment_starts, meta.segment_slots,
        rank, w[0], w[1], w[2], o[0], o[1], o[2],
        y.stride(0), y.stride(1), y.stride(2),
        b[0].stride(0), b[1].stride(0), b[2].stride(0), slices[0].stride(1), slices[0].stride(2),
        out.stride(0), out.stride(1),
        num_n_tiles,
        NUM_SLICES=len(slices), ADD_INPUTS=add_inputs, **config)


def add_lora_linear(meta: TritonLoraMeta, out: torch.Tensor, x: torch.Tensor, lora_a_slices, lora_b_slices,
                    scale: float, output_slices, offset_start: int = 0, add_inputs: bool = True,
                    buffer: torch.Tensor | None = None, partials: torch.Tensor | None = None) -> None:
    """Fused multi-slice LoRA; same semantics as ``reference.add_lora_linear``. ``buffer`` (float32,
    at least [num_slices, T, R]) and ``partials`` (see :func:`lora_shrink`): preallocated scratch,
    so a captured graph allocates nothing; made here when not given."""
    if meta.num_segments == 0:
        return
    rank = as_3d(lora_a_slices[0]).shape[1]
    if buffer is None:
        buffer = torch.empty(len(lora_a_slices), x.shape[0], rank, dtype=torch.float32, device=x.device)
    y = buffer[:len(lora_a_slices), :x.shape[0], :rank]
    lora_shrink(meta, x, lora_a_slices, y, scale, partials)
    lora_expand(meta, y, lora_b_slices, out, output_slices, offset_start, add_inputs)
