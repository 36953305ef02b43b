"""The fast CPU path against the pure-torch reference, over ranks, batch sizes, adapter counts
and adapter popularity, with no-adapter tokens mixed in."""

import pytest
import torch

from loraplex.kernels import cpu_lora, reference
from loraplex.kernels.slot_writes import SlotWrites
from loraplex.kernels.workloads import POPULARITIES, token_slots

from .conftest import (HIDDEN_IN, NUM_ADAPTERS, NUM_TOKENS, RANKS, SLICE_WIDTHS, check_against_reference,
                       make_weights, tolerances)
from .isolation import POISONS, assert_others_identical, base_output, isolation_case


@pytest.mark.parametrize("popularity", POPULARITIES)
@pytest.mark.parametrize("num_adapters", NUM_ADAPTERS)
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
@pytest.mark.parametrize("rank", RANKS)
def test_add_lora_linear_matches_reference(rank, num_tokens, num_adapters, popularity, dtype):
    def run(out, x, lora_a, lora_b, slots, scale, offset_start):
        cpu_lora.add_lora_linear(cpu_lora.build_plan(slots), out, x, lora_a, lora_b, scale, SLICE_WIDTHS,
                                 offset_start=offset_start)

    check_against_reference(run, rank, num_tokens, num_adapters, popularity, dtype)


@pytest.mark.parametrize("popularity", POPULARITIES)
@pytest.mark.parametrize("num_tokens", (7, 600))
def test_float32_compute_on_bfloat16_activations(num_tokens, popularity):
    """What the vLLM wrapper does on CPUs without native bf16: bf16 activations and output,
    float32 copies of the weights (A fused over the slices)."""
    slots = token_slots(num_tokens, 4, popularity, seed=num_tokens)
    lora_a, lora_b = make_weights(4, 16, torch.bfloat16, seed=num_tokens)
    x = torch.randn(num_tokens, HIDDEN_IN).to(torch.bfloat16)
    base = torch.randn(num_tokens, sum(SLICE_WIDTHS)).to(torch.bfloat16)
    expected = reference.add_lora_linear(base.clone(), x, lora_a, lora_b, slots, 1.0, SLICE_WIDTHS)
    actual = base.clone()
    cpu_lora.add_lora_linear(cpu_lora.build_plan(slots), actual, x, lora_a, [b.float() for b in lora_b], 1.0,
                             SLICE_WIDTHS, fused_lora_a=cpu_lora.fuse_slices(lora_a, torch.float32))
    torch.testing.assert_close(actual, expected, **tolerances(torch.bfloat16))
    assert torch.equal(actual[slots == -1], base[slots == -1])


@pytest.mark.parametrize("popularity", POPULARITIES)
@pytest.mark.parametrize("num_tokens", (7, 128))
def test_shrink_and_expand_separately(num_tokens, popularity, dtype):
    """The split form vLLM's row/column-parallel layers use (shrink into a buffer, then expand)."""
    slots = token_slots(num_tokens, 4, popularity, seed=num_tokens)
    lora_a, lora_b = make_weights(4, 16, dtype, seed=num_tokens)
    x = torch.randn(num_tokens, HIDDEN_IN).to(dtype)
    plan = cpu_lora.build_plan(slots)
    y = torch.zeros(num_tokens, 16)
    cpu_lora.lora_shrink(plan, x, lora_a[0], y, 2.0)
    torch.testing.assert_close(y, reference.lora_shrink(x, lora_a[0], slots, 2.0), **tolerances(dtype))
    out = torch.randn(num_tokens, SLICE_WIDTHS[0]).to(dtype)
    expected = reference.lora_expand(y, lora_b[0], slots, out.clone(), add_inputs=False)
    cpu_lora.lora_expand(plan, y, lora_b[0], out, 0, add_inputs=False)
    torch.testing.assert_close(out, expected, **tolerances(dtype))


def test_plan_kinds():
    prefill = torch.tensor([2] * 20 + [-1] * 5 + [0] * 9 + [2] * 8)
    plan = cpu_lora.build_plan(prefill, min_direct_run=8)
    # long runs are used in place, even when a slot has two of them; nothing is gathered
    assert plan.direct_segments == [(0, 20, 2), (25, 34, 0), (34, 42, 2)] and plan.gather is None
    decode = torch.tensor([0, 1, 0, 1, 2, -1, 0, 1] * 2)
    plan = cpu_lora.build_plan(decode, min_group=4)
    assert not plan.direct_segments and plan.num_gathered == 14  # slot-sorted, the -1 tokens left out
    assert plan.gather.tolist() == [0, 2, 6, 8, 10, 14, 1, 3, 7, 9, 11, 15, 4, 12]
    assert plan.gathered_segments == [(0, 6, 0), (6, 12, 1)]
    assert plan.groups.slots.tolist() == [2] and plan.groups.rows == 2 and plan.groups.padding_rows is None
    mixed = torch.tensor([3] * 10 + [1, 0, 1, 1, 0, 2])  # a prefill chunk, then decode tokens
    plan = cpu_lora.build_plan(mixed, min_direct_run=8)
    assert plan.direct_segments == [(0, 10, 3)] and plan.groups.rows == 3
    assert plan.groups.slots.tolist() == [0, 1, 2] and plan.groups.slots_are_prefix
    # groups padded to 3 rows (padding repeats some token: its shrink result is zeroed)
    assert plan.gather.tolist() == [11, 14, 11, 10, 12, 13, 15, 11, 11]
    assert plan.groups.padding_rows.tolist() == [2, 7, 8]
    assert plan.groups.real_tokens.tolist() == [11, 14, 10, 12, 13, 15]
    # slots 0 and 3 only: empty groups for 1 and 2 make the weights a view [:4] (not a copy)
    plan = cpu_lora.build_plan(torch.tensor([3, 0, 3]))
    assert plan.groups.slots.tolist() == [0, 1, 2, 3] and plan.groups.slots_are_prefix
    assert plan.groups.real_tokens.tolist() == [1, 0, 2] and plan.num_gathered == 8
    assert cpu_lora.build_plan(torch.tensor([9, 0])).groups.slots.tolist() == [0, 9]  # too sparse to pad
    assert not cpu_lora.build_plan(torch.full((5,), -1)).has_lora


def test_workload_popularity_shapes():
    assert set(token_slots(64, 4, "identical", no_adapter_fraction=0).tolist()) == {0}
    distinct = token_slots(64, 32, "distinct", no_adapter_fraction=0, num_requests=32)
    assert len(set(distinct.tolist())) == 32
    skewed = token_slots(100, 8, "skewed", no_adapter_fraction=0)
    assert torch.unique_consecutive(skewed, return_counts=True)[1].max() >= 75


@pytest.mark.parametrize("bad_in_batch", (True, False), ids=("bad-in-batch", "bad-idle"))
@pytest.mark.parametrize("poison", POISONS, ids=("nan", "inf"))
@pytest.mark.parametrize("popularity", POPULARITIES)
@pytest.mark.parametrize("num_tokens", (1, 7, 40, 128))
def test_a_bad_slot_never_reaches_other_tokens(num_tokens, popularity, poison, bad_in_batch):
    """0 x NaN = NaN: padding rows and slot-prefix views must never multiply another token's
    rows by the bad slot's weights (fused linear, and shrink/expand apart)."""
    slots, x, (a, b), (bad_a, bad_b), bad = isolation_case(num_tokens, popularity, poison, bad_in_batch)
    outputs = []
    for lora_a, lora_b in ((a, b), (bad_a, bad_b)):
        plan = cpu_lora.build_plan(slots)
        fused = base_output(num_tokens)
        cpu_lora.add_lora_linear(plan, fused, x, lora_a, lora_b, 0.5, SLICE_WIDTHS)
        split = base_output(num_tokens)[:, :SLICE_WIDTHS[0]]
        y = torch.zeros(num_tokens, 16)
        cpu_lora.lora_shrink(plan, x, lora_a[0], y, 0.5)
        cpu_lora.lora_expand(plan, y, lora_b[0], split, 0)
        outputs.append((fused, split))
    for clean, poisoned in zip(*outputs):
        assert_others_identical(slots, clean, poisoned, bad)


def test_per_tensor_cache_refreshes_when_weights_are_written():
    """The wrapper's caches (fused A, float32 and transposed copies) follow vLLM's in-place slot
    loads: a write bumps the version counter and the value is made again."""
    calls = []
    cache = cpu_lora.PerTensorCache(lambda group: calls.append(1) or sum(float(t.sum()) for t in group))
    stacked = (torch.ones(2, 3), torch.ones(2, 3))
    assert cache(stacked) == 12 and cache(stacked) == 12 and len(calls) == 1
    stacked[1][0] = 5.0  # vLLM loading an adapter into slot 0
    assert cache(stacked) == 24 and len(calls) == 2
    assert cache(list(stacked)) == 24 and len(calls) == 3, "another container is another key"
    for _ in range(cpu_lora.PerTensorCache.MAX_ENTRIES + 1):
        cache(list(stacked))
    assert len(cache._cache) <= cpu_lora.PerTensorCache.MAX_ENTRIES


def test_slot_writes_bookkeeping():
    writes = SlotWrites()
    mark = writes.snapshot()
    assert writes.changed_since(mark) == []
    writes.written(3)
    writes.written(1)
    assert writes.changed_since(mark) == [1, 3]
    later = writes.snapshot()
    writes.written(3)
    assert writes.changed_since(later) == [3]
    writes.written(-1)  # a write whose slot is not known: everything counts as written
    assert writes.changed_since(later) is None and writes.changed_since(writes.snapshot()) == []


def _fused_and_transposed(slices):
    """A slot-wise value like the wrapper's: a copy (fused along dim 1) and a view of the first slice."""
    return [torch.cat(list(slices), dim=1), slices[0]]


@pytest.mark.parametrize("noted", [True, False])
def test_per_tensor_cache_refreshes_only_the_written_slot(noted):
    """After vLLM writes one slot (noted by the activation hook), only that slot is recomputed,
    and the value equals a full rebuild; a write nobody noted rebuilds everything."""
    writes = SlotWrites()
    shapes = []

    def fn(slices):
        shapes.append(slices[0].shape[0])
        return _fused_and_transposed(slices)

    cache = cpu_lora.PerTensorCache(fn, writes)
    generator = torch.Generator().manual_seed(0)
    stacked = (torch.randn(4, 2, 3, generator=generator), torch.randn(4, 5, 3, generator=generator))
    first = cache(stacked)
    assert shapes == [4]
    stacked[0][2] = torch.randn(2, 3, generator=generator)  # slot 2 rewritten, as set_lora does
    stacked[1][2] = 0.0
    if noted:
        writes.written(2)
    value = cache(stacked)
    expected = _fused_and_transposed(stacked)
    assert all(torch.equal(v, e) for v, e in zip(value, expected))
    if noted:
        assert shapes == [4, 1] and value[0] is first[0], "one slot recomputed in place"
    else:
        assert shapes == [4, 4], "an unnoted write rebuilds the whole value"
    assert cache(stacked) is value and len(shapes) == 2


def test_per_tensor_cache_refresh_keeps_other_slots_and_caches_apart():
    """A refreshed slot never disturbs the others, and a refresh of a copy never writes into the
    buffer (which would bump its version and make other caches rebuild)."""
    writes = SlotWrites()
    buffer = torch.arange(24, dtype=torch.float32).reshape(4, 2, 3)
    copies = cpu_lora.PerTensorCache(lambda b: b.transpose(1, 2).contiguous(), writes)
    views = cpu_lora.PerTensorCache(lambda b: b.reshape(b.shape[0], -1), writes)
    transposed, flat = copies(buffer), views(buffer)
    before = transposed.clone()
    buffer[1] = -1.0
    writes.written(1)
    version = buffer._version
    assert torch.equal(copies(buffer)[1], buffer[1].T) and torch.equal(views(buffer), buffer.reshape(4, -1))
    assert buffer._version == version
    for slot in (0, 2, 3):
        assert torch.equal(transposed[slot], before[slot])
    assert flat is views(buffer)


def test_float_copies_follow_a_noted_slot_write():
    """bf16 adapters on a CPU computing in float32: the float copy's written slot is refreshed,
    the others kept, and the copy is the same tensor (views made of it stay valid)."""
    writes = SlotWrites()
    compute = cpu_lora.ComputeWeights(enabled=True, slot_writes=writes)
    buffer = torch.randn(3, 1, 4, 2).to(torch.bfloat16)
    copy = compute(buffer)
    buffer[2] = 7.0
    writes.written(2)
    assert compute(buffer) is copy and torch.equal(copy, buffer.float())
