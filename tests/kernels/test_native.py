"""The compiled small-step op (``kernels/csrc/lora_small.cpp``) against the pure-torch reference,
over ranks, batch sizes, adapter counts, popularity and dtypes; and tenant isolation: a NaN/Inf
slot never reaches another token, a slot past the weights is refused."""

from pathlib import Path

import pytest
import torch

from loraplex.kernels import cpu_lora, native, reference
from loraplex.kernels.workloads import POPULARITIES, token_slots
from loraplex.server.default_model import default_cache_dir

from .conftest import HIDDEN_IN, NUM_ADAPTERS, RANKS, SLICE_WIDTHS, check_against_reference, make_weights, tolerances
from .isolation import POISONS, assert_others_identical, base_output, isolation_case


@pytest.fixture(scope="module", params=native.host_variants() or ["avx2"])
def compiled(request):
    """Each build of the op this CPU runs (the AVX2 one; the AVX512-BF16 one where it has that)."""
    if not native.cpu_supported():
        pytest.skip("the compiled op is built for x86-64 with AVX2 only")
    variant = request.param
    if not native.can_build() and native.load(default_cache_dir(), False, variant) is None:
        pytest.skip("no C++ compiler here and no build of the op (the torch ops run instead)")
    module = native.load(default_cache_dir(), variant=variant)  # built by the install script (else now, once)
    assert module is not None, f"x86-64 with {variant} and a compiler: the op must build"
    return module


def compiled_weights(lora_a, lora_b, weight_dtype=None):
    """(fused A, B transposed per slice), as the wrapper hands them to the op."""
    fused_a = cpu_lora.fuse_slices(lora_a, weight_dtype)
    return fused_a, [reference.as_3d(b).to(weight_dtype or b.dtype).transpose(1, 2).contiguous() for b in lora_b]


def run_compiled(compiled, out, x, lora_a, lora_b, slots, scale, offset=0, weight_dtype=None, held=True):
    """Through a ``Layer`` holding the weights, as the wrapper calls it (``held``), or with the
    weights passed in the call."""
    fused_a, slices_b_t = compiled_weights(lora_a, lora_b, weight_dtype)
    if held:
        compiled.add_lora_linear_layer(out, x, slots, compiled.Layer(fused_a, slices_b_t), scale, offset)
    else:
        compiled.add_lora_linear(out, x, slots, fused_a, slices_b_t, scale, offset)
    return out


@pytest.mark.parametrize("popularity", POPULARITIES)
@pytest.mark.parametrize("num_adapters", NUM_ADAPTERS)
@pytest.mark.parametrize("num_tokens", (1, 2, 7, 32, 64, 150))
@pytest.mark.parametrize("rank", RANKS)
def test_matches_reference(compiled, rank, num_tokens, num_adapters, popularity, dtype):
    def run(out, x, lora_a, lora_b, slots, scale, offset_start):
        run_compiled(compiled, out, x, lora_a, lora_b, slots, scale, offset=offset_start)

    check_against_reference(run, rank, num_tokens, num_adapters, popularity, dtype)


@pytest.mark.parametrize("threads", (1, 2))
@pytest.mark.parametrize("num_tokens", (1, 2, 5, 9))
def test_real_widths_on_one_and_two_cores(compiled, num_tokens, threads):
    """The default model's widths (q/k/v, a gate/up of 1536) and an odd one, tiles split over one
    or two cores: the reference's result, no-adapter rows untouched."""
    widths, rank, hidden, num_slots = (576, 192, 192, 1536, 300), 16, 576, 3
    g = torch.Generator().manual_seed(num_tokens)
    lora_a = [torch.randn(num_slots, 1, rank, hidden, generator=g) / hidden ** 0.5 for _ in widths]
    lora_b = [torch.randn(num_slots, 1, width, rank, generator=g) / rank ** 0.5 for width in widths]
    slots = torch.tensor([-1, 0, 2, 2, 1, -1, 0, 0, 2][:num_tokens])
    x = torch.randn(num_tokens, hidden, generator=g)
    base = torch.randn(num_tokens, sum(widths) + 3, generator=g)
    expected = reference.add_lora_linear(base.clone(), x, lora_a, lora_b, slots, 0.5, widths, offset_start=3)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        actual = run_compiled(compiled, base.clone(), x, lora_a, lora_b, slots, 0.5, offset=3)
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(actual[slots == -1], base[slots == -1])


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("run_length", range(1, 18))
def test_every_tile_size_on_odd_widths(compiled, run_length, dtype):
    """A run of 1..17 tokens on one slot (tiles of every size, the last one partial), between
    tokens of other slots, on widths that are not multiples of the op's 8 or 32 columns: every
    vector loop's remainder runs."""
    widths, rank, hidden, num_slots = (13, 40, 5, 75), 4, 77, 3
    g = torch.Generator().manual_seed(run_length)
    lora_a = [(torch.randn(num_slots, 1, rank, hidden, generator=g) / hidden ** 0.5).to(dtype) for _ in widths]
    lora_b = [(torch.randn(num_slots, 1, width, rank, generator=g) / rank ** 0.5).to(dtype) for width in widths]
    slots = torch.tensor([2, -1] + [1] * run_length + [0, -1, 2])
    x = torch.randn(len(slots), hidden, generator=g).to(dtype)
    base = torch.randn(len(slots), sum(widths) + 2, generator=g).to(dtype)
    expected = reference.add_lora_linear(base.clone(), x, lora_a, lora_b, slots, 0.5, widths, offset_start=1)
    actual = run_compiled(compiled, base.clone(), x, lora_a, lora_b, slots, 0.5, offset=1)
    torch.testing.assert_close(actual, expected, **tolerances(dtype))
    assert torch.equal(actual[slots == -1], base[slots == -1])
    assert torch.equal(actual[:, 0], base[:, 0]) and torch.equal(actual[:, -1], base[:, -1])


@pytest.mark.parametrize("rank", (1, 5, 128, 130))
@pytest.mark.parametrize("run_length", (1, 3, 8, 11))
def test_odd_and_large_ranks_in_bfloat16(compiled, rank, run_length):
    """The AVX512-BF16 expand takes ranks in pairs, up to 128: an odd rank, 128 and one past it
    (the float expand then) give the reference's result, on widths with a remainder of 16."""
    widths, hidden, num_slots = (48, 21, 40), 70, 2
    g = torch.Generator().manual_seed(rank * 100 + run_length)
    lora_a = [(torch.randn(num_slots, 1, rank, hidden, generator=g) / hidden ** 0.5).bfloat16() for _ in widths]
    lora_b = [(torch.randn(num_slots, 1, width, rank, generator=g) / rank ** 0.5).bfloat16() for width in widths]
    slots = torch.tensor([0] + [1] * run_length + [-1])
    x = torch.randn(len(slots), hidden, generator=g).bfloat16()
    base = torch.randn(len(slots), sum(widths), generator=g).bfloat16()
    expected = reference.add_lora_linear(base.clone(), x, lora_a, lora_b, slots, 0.5, widths)
    actual = run_compiled(compiled, base.clone(), x, lora_a, lora_b, slots, 0.5)
    torch.testing.assert_close(actual, expected, **tolerances(torch.bfloat16))
    assert torch.equal(actual[-1], base[-1])


@pytest.mark.parametrize("popularity", POPULARITIES)
def test_float32_weights_on_bfloat16_activations(compiled, popularity):
    """What the wrapper hands it on CPUs without native bf16: bf16 rows, float32 weight copies."""
    slots = token_slots(16, 4, popularity, seed=3)
    lora_a, lora_b = make_weights(4, 16, torch.bfloat16, seed=3)
    x = torch.randn(16, HIDDEN_IN).to(torch.bfloat16)
    base = torch.randn(16, sum(SLICE_WIDTHS)).to(torch.bfloat16)
    expected = reference.add_lora_linear(base.clone(), x, lora_a, lora_b, slots, 1.0, SLICE_WIDTHS)
    actual = run_compiled(compiled, base.clone(), x, lora_a, lora_b, slots, 1.0, weight_dtype=torch.float32)
    torch.testing.assert_close(actual, expected, **tolerances(torch.bfloat16))


@pytest.mark.parametrize("weights_dtype", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("popularity", POPULARITIES)
@pytest.mark.parametrize("num_tokens", (1, 3, 40, 150))
def test_low_precision_weights_on_float32_activations(compiled, num_tokens, popularity, weights_dtype):
    """What the wrapper hands it for a float32 model with adapters stored in bf16 or fp16
    (--lora-dtype): float32 rows, the weights as stored. The op widens them as it reads them, so
    the result is float32 copies' to the bit."""
    slots = token_slots(num_tokens, 4, popularity, seed=5)
    lora_a, lora_b = make_weights(4, 16, weights_dtype, seed=5)
    x = torch.randn(num_tokens, HIDDEN_IN)
    base = torch.randn(num_tokens, sum(SLICE_WIDTHS))
    expected = reference.add_lora_linear(base.clone(), x, lora_a, lora_b, slots, 0.5, SLICE_WIDTHS)
    as_stored = run_compiled(compiled, base.clone(), x, lora_a, lora_b, slots, 0.5)
    from_copies = run_compiled(compiled, base.clone(), x, lora_a, lora_b, slots, 0.5, weight_dtype=torch.float32)
    assert torch.equal(as_stored, from_copies)
    torch.testing.assert_close(as_stored, expected, **tolerances(torch.float32))


@pytest.mark.parametrize("poison", POISONS, ids=("nan", "inf"))
@pytest.mark.parametrize("popularity", POPULARITIES)
def test_a_bad_slot_stored_in_bfloat16_never_reaches_float32_tokens(compiled, popularity, poison):
    """Float32 rows, weights as --lora-dtype bfloat16 stores them: a NaN/Inf slot still shows
    only in its own tokens."""
    slots, x, (a, b), (bad_a, bad_b), bad = isolation_case(64, popularity, poison, bad_in_batch=True)
    a, b, bad_a, bad_b = ([w.bfloat16() for w in ws] for ws in (a, b, bad_a, bad_b))
    clean = run_compiled(compiled, base_output(64), x, a, b, slots, 0.5)
    poisoned = run_compiled(compiled, base_output(64), x, bad_a, bad_b, slots, 0.5)
    assert_others_identical(slots, clean, poisoned, bad)
    assert not torch.isfinite(poisoned[slots == bad]).all(), "the bad slot's own tokens must show it"


def test_rows_past_the_tokens_and_strided_rows(compiled):
    """vLLM may hand over buffers with spare rows; only the tokens' rows are touched."""
    slots = torch.tensor([0, -1, 1])
    lora_a, lora_b = make_weights(2, 8, torch.float32, seed=1)
    x = torch.randn(5, HIDDEN_IN)
    wide = torch.randn(5, sum(SLICE_WIDTHS) + 10)
    out = wide[:, 3:3 + sum(SLICE_WIDTHS)]  # row stride > width
    before = wide.clone()
    run_compiled(compiled, out, x, lora_a, lora_b, slots, 1.0)
    expected = reference.add_lora_linear(before[:3, 3:3 + sum(SLICE_WIDTHS)].clone(), x[:3], lora_a, lora_b,
                                         slots, 1.0, SLICE_WIDTHS)
    torch.testing.assert_close(wide[:3, 3:3 + sum(SLICE_WIDTHS)], expected)
    assert torch.equal(wide[3:], before[3:]) and torch.equal(wide[:, :3], before[:, :3])
    assert torch.equal(wide[:, 3 + sum(SLICE_WIDTHS):], before[:, 3 + sum(SLICE_WIDTHS):])


@pytest.mark.parametrize("bad_in_batch", (True, False), ids=("bad-in-batch", "bad-idle"))
@pytest.mark.parametrize("poison", POISONS, ids=("nan", "inf"))
@pytest.mark.parametrize("popularity", POPULARITIES)
@pytest.mark.parametrize("num_tokens", (1, 7, 32, 128, 600))  # (float32 runs of any length reach the op)
def test_a_bad_slot_never_reaches_other_tokens(compiled, num_tokens, popularity, poison, bad_in_batch, dtype):
    """In float32 and in bfloat16 (the AVX512-BF16 build's bf16-pair shrink and expand)."""
    slots, x, (a, b), (bad_a, bad_b), bad = isolation_case(num_tokens, popularity, poison, bad_in_batch)
    x, a, b, bad_a, bad_b = x.to(dtype), *([w.to(dtype) for w in ws] for ws in (a, b, bad_a, bad_b))
    clean = run_compiled(compiled, base_output(num_tokens).to(dtype), x, a, b, slots, 0.5)
    poisoned = run_compiled(compiled, base_output(num_tokens).to(dtype), x, bad_a, bad_b, slots, 0.5)
    assert_others_identical(slots, clean, poisoned, bad)
    if bad_in_batch:
        assert not torch.isfinite(poisoned[slots == bad]).all(), "the bad slot's own tokens must show it"


def test_weights_in_the_call_and_held_weights_agree(compiled, dtype):
    """The two entry points run one computation: bit-identical outputs."""
    lora_a, lora_b = make_weights(3, 8, dtype, seed=2)
    slots, x = torch.tensor([2, -1, 0, 0, 1, 2]), torch.randn(6, HIDDEN_IN).to(dtype)
    passed, held = (run_compiled(compiled, torch.zeros(6, sum(SLICE_WIDTHS) + 2, dtype=dtype), x, lora_a, lora_b,
                                 slots, 0.5, offset=1, held=held) for held in (False, True))
    assert torch.equal(passed, held)


HELD = pytest.mark.parametrize("held", (True, False), ids=("held", "passed"))


@HELD
@pytest.mark.parametrize("slot", (2, 99, -2))
def test_a_slot_outside_the_weights_is_refused(compiled, slot, held):
    lora_a, lora_b = make_weights(2, 8, torch.float32, seed=0)
    out = torch.zeros(3, sum(SLICE_WIDTHS))
    with pytest.raises(RuntimeError, match="slot out of range"):
        run_compiled(compiled, out, torch.randn(3, HIDDEN_IN), lora_a, lora_b, torch.tensor([0, slot, 1]), 1.0,
                     held=held)
    assert torch.equal(out, torch.zeros_like(out)), "nothing is written before the slots are checked"


@HELD
def test_shapes_that_disagree_are_refused(compiled, held):
    lora_a, lora_b = make_weights(2, 8, torch.float32, seed=0)
    slots = torch.tensor([0, 1])
    with pytest.raises(RuntimeError, match="columns out of range"):
        run_compiled(compiled, torch.zeros(2, 10), torch.randn(2, HIDDEN_IN), lora_a, lora_b, slots, 1.0, held=held)
    with pytest.raises(RuntimeError, match="disagree on H"):
        run_compiled(compiled, torch.zeros(2, sum(SLICE_WIDTHS)), torch.randn(2, 3), lora_a, lora_b, slots, 1.0,
                     held=held)
    with pytest.raises(RuntimeError, match="int64"):
        run_compiled(compiled, torch.zeros(2, sum(SLICE_WIDTHS)), torch.randn(2, HIDDEN_IN), lora_a, lora_b,
                     slots.int(), 1.0, held=held)
    with pytest.raises(RuntimeError, match="one dtype"):
        run_compiled(compiled, torch.zeros(2, sum(SLICE_WIDTHS), dtype=torch.bfloat16), torch.randn(2, HIDDEN_IN),
                     lora_a, lora_b, slots, 1.0, held=held)


def test_weights_that_disagree_are_refused_when_held(compiled):
    """A Layer checks its weights once, when it is made: every call after trusts them."""
    fused_a, slices_b_t = compiled_weights(*make_weights(2, 8, torch.float32, seed=0))
    with pytest.raises(RuntimeError, match="add up"):
        compiled.Layer(fused_a, slices_b_t[:-1])
    with pytest.raises(RuntimeError, match="lora_a's dtype"):
        compiled.Layer(fused_a, [slices_b_t[0].bfloat16(), *slices_b_t[1:]])
    with pytest.raises(RuntimeError, match="contiguous"):
        compiled.Layer(fused_a, [slices_b_t[0].transpose(1, 2), *slices_b_t[1:]])
    with pytest.raises(RuntimeError, match="contiguous"):
        compiled.Layer(fused_a.transpose(1, 2), slices_b_t)
    with pytest.raises(RuntimeError, match="lora_b_t"):
        compiled.Layer(fused_a, [slices_b_t[0][:1], *slices_b_t[1:]])  # fewer slots than A
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        compiled.Layer(fused_a.double(), [b.double() for b in slices_b_t])
    with pytest.raises(TypeError):
        compiled.add_lora_linear_layer(torch.zeros(1, sum(SLICE_WIDTHS)), torch.randn(1, HIDDEN_IN),
                                       torch.tensor([0]), (fused_a, slices_b_t), 1.0, 0)


def test_a_stale_build_is_never_loaded(tmp_path):
    """The build folder is named by the source, flags and torch version."""
    first = native.build_dir(tmp_path)
    assert first.parent == tmp_path / "native" and first.name.startswith("lora_small-")
    assert native.build_dir(tmp_path) == first


@pytest.mark.parametrize("damage", ("truncated", "garbage", "deleted"))
def test_a_damaged_build_falls_back_to_the_torch_ops(tmp_path, monkeypatch, damage, caplog):
    """A build rewritten, truncated or deleted after it was made: the op is unavailable (a
    warning), nothing raises, and a later lookup that may build is not answered from memory."""
    if not native.cpu_supported():
        pytest.skip("the compiled op is built for x86-64 with AVX2 only")
    monkeypatch.setattr(native, "environment_root", lambda: tmp_path / "env")  # no prebuilt op there
    monkeypatch.setattr(native, "_loaded", {})
    directory = native.build_dir(tmp_path / "cache")
    directory.mkdir(parents=True)
    library = directory / f"{native.module_name(directory)}.so"
    if damage == "truncated":
        library.write_bytes(b"\x7fELF\x02\x01\x01")
    elif damage == "garbage":
        library.write_bytes(b"not a shared object \xff\xfe" * 100)
    assert native.load(tmp_path / "cache", build_if_missing=False) is None
    if damage != "deleted":
        assert "unavailable" in caplog.text
    assert directory not in native._loaded, "a no-build miss must not stop a later build"


@pytest.mark.parametrize("argv", (["--tokens", "0"], ["--tokens", "1", "--repeats", "0"]))
def test_step_benchmark_checks_its_arguments(argv, capsys):
    from loraplex.kernels.bench_step_op import main

    with pytest.raises(SystemExit):
        main(argv)
    assert "at least 1" in capsys.readouterr().err


def test_step_benchmark_refuses_a_build_this_cpu_does_not_run(tmp_path, capsys):
    from loraplex.kernels.bench_step_op import main

    if native.load(native.environment_root(), build_if_missing=False) is None:
        pytest.skip("no build of the op in this environment")
    assert main(["--runs", "8", "--variants", "avx2,sse1", "--out", str(tmp_path / "out.json")]) == 1
    assert "builds not available on this CPU: sse1" in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()


def test_step_benchmark_weights_are_the_wrappers_layout():
    """[S, R * slices, H] A and [S, R, N_i] transposed B per call, four calls a layer."""
    from loraplex.kernels.bench_step_op import LAYER_CALLS, NUM_LAYERS, step_weights

    calls = step_weights(num_slots=2, rank=4, dtype=torch.float32)
    assert len(calls) == NUM_LAYERS * len(LAYER_CALLS)
    lora_a, lora_b_t = calls[2]  # gate/up
    assert lora_a.shape == (2, 8, 576) and [b.shape for b in lora_b_t] == [(2, 4, 1536), (2, 4, 1536)]


def test_a_prebuilt_build_comes_before_a_new_one_and_a_damaged_best_falls_back(tmp_path, monkeypatch, caplog):
    """On a CPU with a better build than the environment holds (an image made on an older
    machine), the prebuilt one is loaded, nothing is compiled; a damaged best build falls back to
    the next one."""
    if not native.cpu_supported():
        pytest.skip("the compiled op is built for x86-64 with AVX2 only")
    prebuilt = native.load(default_cache_dir(), variant="avx2")
    if prebuilt is None:
        pytest.skip("no AVX2 build of the op here")
    env = tmp_path / "env"
    monkeypatch.setattr(native, "environment_root", lambda: env)
    monkeypatch.setattr(native, "host_variants", lambda: ["avx512bf16", "avx2"])  # looked up, never run
    monkeypatch.setattr(native, "_loaded", {})

    def no_build(*args):
        raise AssertionError("a prebuilt op was there: nothing may be compiled")

    monkeypatch.setattr(native, "build", no_build)
    loaded_from = []  # (the module object is Python's, cached by name: its __file__ is the first load's)
    spec_from_file = native.importlib.util.spec_from_file_location
    monkeypatch.setattr(native.importlib.util, "spec_from_file_location",
                        lambda name, path: loaded_from.append(Path(path).parent) or spec_from_file(name, path))
    avx2_dir = native.build_dir(env, "avx2")
    avx2_dir.mkdir(parents=True)
    (avx2_dir / Path(prebuilt.__file__).name).write_bytes(Path(prebuilt.__file__).read_bytes())
    assert native.load(tmp_path / "cache") is not None and loaded_from == [avx2_dir]
    assert "unavailable" not in caplog.text  # (a build attempted would have been logged there)

    loaded_from.clear()
    monkeypatch.setattr(native, "_loaded", {})
    best_dir = native.build_dir(env, "avx512bf16")
    best_dir.mkdir(parents=True)
    (best_dir / f"{native.module_name(best_dir)}.so").write_bytes(b"not a shared object" * 10)
    assert native.load(tmp_path / "cache") is not None and loaded_from == [best_dir, avx2_dir]
    assert "(avx512bf16) is unavailable" in caplog.text
