"""Triton ops against the reference. On CPU they run in the Triton interpreter
(TRITON_INTERPRET=1, set for this module before triton is imported); on CUDA natively."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from loraplex.kernels import reference, triton_lora  # noqa: E402
from loraplex.kernels.workloads import POPULARITIES, token_slots  # noqa: E402

from .conftest import HIDDEN_IN, SLICE_WIDTHS, make_weights, tolerances  # noqa: E402
from .isolation import POISONS, assert_others_identical, base_output, isolation_case  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("triton was imported without the interpreter", allow_module_level=True)


def run_case(rank, num_tokens, num_adapters, popularity, dtype, num_slices=3):
    seed = rank * 1000 + num_tokens * 10 + num_adapters
    slots = token_slots(num_tokens, num_adapters, popularity, seed=seed)
    lora_a, lora_b = make_weights(num_adapters, rank, dtype, seed)
    lora_a, lora_b, widths = lora_a[:num_slices], lora_b[:num_slices], SLICE_WIDTHS[:num_slices]
    x = torch.randn(num_tokens, HIDDEN_IN, generator=torch.Generator().manual_seed(seed)).to(dtype)
    base = torch.randn(num_tokens, sum(widths) + 8).to(dtype)
    expected = reference.add_lora_linear(base.clone(), x, lora_a, lora_b, slots, 0.5, widths, offset_start=4)
    on = lambda t: t.to(DEVICE)  # noqa: E731
    actual = on(base.clone())
    meta = triton_lora.build_meta(on(slots))
    triton_lora.add_lora_linear(meta, actual, on(x), [on(a) for a in lora_a], [on(b) for b in lora_b], 0.5, widths,
                                offset_start=4)
    torch.testing.assert_close(actual.cpu(), expected, **tolerances(dtype))
    untouched = slots == -1
    assert torch.equal(actual.cpu()[untouched], base[untouched])


@pytest.mark.parametrize("popularity", POPULARITIES)
@pytest.mark.parametrize("rank", (8, 16, 64))
def test_fused_slices_over_ranks_and_popularity(rank, popularity, dtype):
    run_case(rank, 7, 4, popularity, dtype)


@pytest.mark.parametrize("num_tokens, num_adapters", [(1, 1), (128, 32), (600, 4)])
@pytest.mark.parametrize("popularity", ("distinct", "zipf", "skewed"))
def test_batch_sizes_and_adapter_counts(num_tokens, num_adapters, popularity):
    run_case(16, num_tokens, num_adapters, popularity, torch.float32, num_slices=2)


def test_split_k_shrink_alone_and_tile_table():
    assert triton_lora.tile_config("shrink", 16)["SPLIT_K"] > 1  # the small-rank config splits K
    slots = torch.tensor([0, 0, -1, 1, 1, 0, 2])
    lora_a, _ = make_weights(3, 16, torch.float32, seed=3)
    x = torch.randn(7, HIDDEN_IN)
    y = torch.full((1, 7, 16), 7.0)
    triton_lora.lora_shrink(triton_lora.build_meta(slots.to(DEVICE)), x.to(DEVICE), [lora_a[0].to(DEVICE)],
                            y := y.to(DEVICE), 2.0)
    expected = reference.lora_shrink(x, lora_a[0], slots, 2.0)
    has = slots != -1
    torch.testing.assert_close(y[0].cpu()[has], expected[has], atol=1e-4, rtol=1e-4)
    assert torch.all(y[0].cpu()[~has] == 7.0)


def test_meta_follows_the_segment_convention():
    meta = triton_lora.build_meta(torch.tensor([2, -1, 0, 2, 0, 0]))
    assert meta.segment_starts.tolist() == [0, 3, 5]  # s[0] = 0, s[-1] = tokens with an adapter
    assert meta.segment_slots.tolist() == [0, 2]
    assert meta.sorted_token_ids.tolist() == [2, 4, 5, 0, 3]
    assert meta.max_segment_len == 3


@pytest.mark.parametrize("bad_in_batch", (True, False), ids=("bad-in-batch", "bad-idle"))
@pytest.mark.parametrize("poison", POISONS, ids=("nan", "inf"))
@pytest.mark.parametrize("popularity", ("distinct", "zipf", "skewed"))
@pytest.mark.parametrize("fixed_meta", (False, True), ids=("exact-meta", "graph-safe-meta"))
def test_a_bad_slot_never_reaches_other_tokens(popularity, poison, bad_in_batch, fixed_meta):
    """Also on the graph-safe path: one segment per slot, split-K partial planes reused."""
    slots, x, (a, b), (bad_a, bad_b), bad = isolation_case(40, popularity, poison, bad_in_batch)
    on = lambda t: t.to(DEVICE)  # noqa: E731
    buffers = triton_lora.MetaBuffers(max_loras=len(a[0]), max_num_tokens=40, device=DEVICE)
    outputs = []
    for lora_a, lora_b in ((a, b), (bad_a, bad_b)):
        out = on(base_output(40))
        meta = buffers.fill(on(slots)) if fixed_meta else triton_lora.build_meta(on(slots))
        triton_lora.add_lora_linear(meta, out, on(x), [on(t) for t in lora_a], [on(t) for t in lora_b], 0.5,
                                    SLICE_WIDTHS)
        outputs.append(out.cpu())
    assert_others_identical(slots, *outputs, bad)


def test_fixed_meta_has_one_segment_per_slot_no_adapter_first():
    buffers = triton_lora.MetaBuffers(max_loras=4, max_num_tokens=16, device=DEVICE)
    meta = buffers.fill(torch.tensor([2, -1, 0, 2, 0, 0], device=DEVICE))
    assert meta.segment_starts.tolist() == [1, 4, 4, 6, 6]  # 1 no-adapter token sorts first
    assert meta.segment_slots.tolist() == [0, 1, 2, 3]
    assert meta.sorted_token_ids.tolist() == [1, 2, 4, 5, 0, 3]
    assert meta.max_segment_len == 6  # the launch bound is the token count, not a device value
    assert meta.sorted_token_ids.data_ptr() == buffers.sorted_token_ids.data_ptr(), "filled in place"
    with pytest.raises(ValueError, match="sized for 16"):
        buffers.fill(torch.zeros(17, dtype=torch.long, device=DEVICE))


@pytest.mark.parametrize("popularity", POPULARITIES)
def test_fixed_meta_reused_across_steps_matches_reference(popularity):
    """The graph-safe path: one set of buffers (metadata, shrink output, split-K partials), filled
    again for every step, as a replayed CUDA graph sees them."""
    num_slots, rank = 5, 16
    buffers = triton_lora.MetaBuffers(max_loras=num_slots, max_num_tokens=64, device=DEVICE)
    split_k = triton_lora.tile_config("shrink", rank)["SPLIT_K"]
    shrink_out = torch.empty(3, 64, rank, dtype=torch.float32, device=DEVICE)
    partials = torch.empty(split_k, 3, 64, rank, dtype=torch.float32, device=DEVICE)
    lora_a, lora_b = make_weights(num_slots, rank, torch.float32, seed=11)
    on = lambda t: t.to(DEVICE)  # noqa: E731
    for step, num_tokens in enumerate((40, 7, 64)):
        slots = token_slots(num_tokens, num_slots, popularity, seed=step)
        x = torch.randn(num_tokens, HIDDEN_IN, generator=torch.Generator().manual_seed(step))
        base = base_output(num_tokens)
        expected = reference.add_lora_linear(base.clone(), x, lora_a, lora_b, slots, 0.5, SLICE_WIDTHS)
        actual = on(base.clone())
        triton_lora.add_lora_linear(buffers.fill(on(slots)), actual, on(x), [on(a) for a in lora_a],
                                    [on(b) for b in lora_b], 0.5, SLICE_WIDTHS, buffer=shrink_out, partials=partials)
        torch.testing.assert_close(actual.cpu(), expected, atol=1e-4, rtol=1e-4)
        assert torch.equal(actual.cpu()[slots == -1], base[slots == -1])


def test_split_k_is_deterministic():
    """Partial sums added in a fixed order (no atomics): the same inputs give the same bits."""
    slots = token_slots(48, 4, "zipf", seed=5)
    lora_a, lora_b = make_weights(4, 16, torch.float32, seed=5)
    x = torch.randn(48, HIDDEN_IN, generator=torch.Generator().manual_seed(5))
    on = lambda t: t.to(DEVICE)  # noqa: E731
    outputs = []
    for _ in range(2):
        out = on(base_output(48))
        triton_lora.add_lora_linear(triton_lora.build_meta(on(slots)), out, on(x), [on(a) for a in lora_a],
                                    [on(b) for b in lora_b], 0.5, SLICE_WIDTHS)
        outputs.append(out.cpu())
    assert torch.equal(*outputs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
def test_cuda_graph_replay_on_new_metadata_is_bit_identical_to_eager():
    num_slots, rank, rows = 4, 16, 32
    buffers = triton_lora.MetaBuffers(max_loras=num_slots, max_num_tokens=rows, device="cuda")
    shrink_out = torch.empty(3, rows, rank, dtype=torch.float32, device="cuda")
    partials = torch.empty(4, 3, rows, rank, dtype=torch.float32, device="cuda")
    lora_a, lora_b = [[t.cuda() for t in ts] for ts in make_weights(num_slots, rank, torch.float32, seed=2)]
    x = torch.randn(rows, HIDDEN_IN, device="cuda")
    out = torch.zeros(rows, sum(SLICE_WIDTHS), device="cuda")

    def step():
        out.zero_()
        meta = triton_lora.TritonLoraMeta(buffers.sorted_token_ids[:rows], buffers.segment_starts,
                                          buffers.segment_slots, rows, rows)
        triton_lora.add_lora_linear(meta, out, x, lora_a, lora_b, 0.5, SLICE_WIDTHS, buffer=shrink_out,
                                    partials=partials)

    buffers.fill(token_slots(rows, num_slots, "uniform", seed=0).cuda())
    step()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for seed, popularity in enumerate(("zipf", "distinct", "identical", "skewed")):
        slots = token_slots(rows, num_slots, popularity, seed=seed + 1).cuda()
        buffers.fill(slots)
        graph.replay()
        replayed = out.clone()
        step()
        assert torch.equal(replayed, out), popularity
        expected = reference.add_lora_linear(torch.zeros(rows, sum(SLICE_WIDTHS)), x.cpu(), [a.cpu() for a in lora_a],
                                             [b.cpu() for b in lora_b], slots.cpu(), 0.5, SLICE_WIDTHS)
        torch.testing.assert_close(out.cpu(), expected, atol=1e-3, rtol=1e-3)


def test_tile_configs_are_data_per_device_with_a_default(monkeypatch):
    tables = triton_lora.tile_tables()
    assert triton_lora.DEFAULT_DEVICE in tables
    for op in ("shrink", "expand"):
        bounds = [bound for bound, _ in tables["default"][op]]
        assert bounds[-1] is None, "the last row takes any rank"
        assert triton_lora.tile_config(op, 4096)  # any rank has a config
    assert triton_lora.tile_config("shrink", 16, "no such GPU") == triton_lora.tile_config("shrink", 16)
    tuned = {op: [(None, dict(rows[0][1], BLOCK_M=64))] for op, rows in tables["default"].items()}
    monkeypatch.setitem(tables, "NVIDIA Test GPU", tuned)
    assert triton_lora.tile_config("expand", 8, "NVIDIA Test GPU")["BLOCK_M"] == 64
    assert triton_lora.max_split_k(8, "NVIDIA Test GPU") == tuned["shrink"][0][1]["SPLIT_K"]
    assert triton_lora.device_name("cpu") == "cpu"
