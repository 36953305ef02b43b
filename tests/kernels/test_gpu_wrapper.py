"""The CUDA punica wrapper (our Triton ops inside vLLM's PunicaWrapperGPU), driven through vLLM's
own metadata path. On CPU it runs in the Triton interpreter (the kernels' conftest sets it)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from loraplex.kernels import reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("triton was imported without the interpreter", allow_module_level=True)


def make_wrapper(max_loras=4, max_rank=16, max_tokens=64):
    from vllm.config.lora import LoRAConfig

    from loraplex.kernels.gpu_wrapper import LoraplexPunicaWrapperGPU

    config = LoRAConfig(max_loras=max_loras, max_lora_rank=max_rank)
    return LoraplexPunicaWrapperGPU(max_num_batched_tokens=max_tokens, max_batches=max_tokens, device=DEVICE,
                                    lora_config=config)


def update(wrapper, index_mapping, lora_index_to_id, is_prefill=True):
    from vllm.lora.layers import LoRAMapping

    wrapper.update_metadata(LoRAMapping(index_mapping, index_mapping, is_prefill=is_prefill), lora_index_to_id,
                            max_loras=len(lora_index_to_id), vocab_size=100)


def test_is_vllms_cuda_wrapper_with_our_ops():
    from vllm.lora.punica_wrapper.punica_gpu import PunicaWrapperGPU

    from loraplex.kernels import vllm_plugin
    from loraplex.kernels.gpu_wrapper import LoraplexPunicaWrapperGPU

    assert issubclass(LoraplexPunicaWrapperGPU, PunicaWrapperGPU)
    assert vllm_plugin.GPU_WRAPPER == f"{LoraplexPunicaWrapperGPU.__module__}.{LoraplexPunicaWrapperGPU.__name__}"


@pytest.mark.parametrize("is_prefill", (True, False))
def test_linear_lora_through_vllm_metadata(is_prefill):
    """Adapter ids per token (0 = none) -> slots via lora_index_to_id; steps of different sizes
    reuse the same preallocated buffers."""
    wrapper = make_wrapper()
    g = torch.Generator().manual_seed(0)
    lora_a = tuple(torch.randn(4, 1, 16, 32, generator=g) for _ in range(3))
    lora_b = tuple(torch.randn(4, 1, width, 16, generator=g) for width in (24, 8, 8))
    on = lambda t: t.to(DEVICE)  # noqa: E731
    for index_mapping in ((7, 7, 7, 0, 9, 9, 7, 0), (9,), (0, 0), (5, 9, 7, 5) * 10):
        update(wrapper, index_mapping, [9, 7, None, 5], is_prefill)
        slots = wrapper.token_lora_indices.cpu()
        x = torch.randn(len(index_mapping), 32, generator=g)
        out = torch.randn(len(index_mapping), 40, generator=g)
        expected = reference.add_lora_linear(out.clone(), x, lora_a, lora_b, slots, 0.5, (24, 8, 8))
        actual = on(out.clone())
        wrapper.add_lora_linear(actual, on(x), tuple(map(on, lora_a)), tuple(map(on, lora_b)), 0.5, (24, 8, 8))
        torch.testing.assert_close(actual.cpu(), expected, atol=1e-4, rtol=1e-4)
        assert torch.equal(actual.cpu()[slots == -1], out[slots == -1]), "a no-adapter token was modified"


def test_shrink_expand_embedding_and_logits():
    wrapper = make_wrapper()
    update(wrapper, (7, 0, 9, 7), [9, 7, None, None])
    slots = wrapper.token_lora_indices.cpu()
    g = torch.Generator().manual_seed(1)
    lora_a = torch.randn(4, 1, 16, 32, generator=g)
    lora_b = torch.randn(4, 1, 24, 16, generator=g)
    x = torch.randn(4, 32, generator=g)
    on = lambda t: t.to(DEVICE)  # noqa: E731
    # shrink into a buffer, then expand (the split form vLLM's row-parallel layers use)
    y = on(torch.zeros(1, 4, 16))
    wrapper.add_shrink(y, on(x), (on(lora_a),), 2.0)
    expected_y = reference.lora_shrink(x, lora_a, slots, 2.0)
    torch.testing.assert_close(y[0].cpu(), expected_y, atol=1e-4, rtol=1e-4)
    out = torch.randn(4, 24, generator=g)
    actual = on(out.clone())
    wrapper.add_expand(actual, y, (on(lora_b),), (24,))
    torch.testing.assert_close(actual.cpu(), reference.lora_expand(expected_y, lora_b, slots, out.clone()),
                               atol=1e-4, rtol=1e-4)
    # embedding: x holds each token's row of its adapter's embedding A
    rows = torch.randn(4, 16, generator=g)
    out = torch.randn(4, 24, generator=g)
    actual = on(out.clone())
    wrapper.add_lora_embedding(actual, on(rows), on(lora_b))
    torch.testing.assert_close(actual.cpu(), reference.lora_expand(rows, lora_b, slots, out.clone()),
                               atol=1e-4, rtol=1e-4)
    # lm_head over the sampled rows (prefill: one per sequence; here every token is its own)
    logits = torch.randn(4, 30, generator=g)
    actual = on(logits.clone())
    sampler_slots = wrapper.sampler_indices.cpu()
    wrapper.add_lora_logits(actual, on(x), on(lora_a), on(lora_b), 1.0)
    expected = logits.clone()
    reference.add_lora_linear(expected[:, :24], x, (lora_a,), (lora_b,), sampler_slots, 1.0, (24,))
    torch.testing.assert_close(actual.cpu(), expected, atol=1e-4, rtol=1e-4)


def test_a_step_without_adapters_launches_nothing(monkeypatch):
    from loraplex.kernels import triton_lora

    wrapper = make_wrapper()
    update(wrapper, (0, 0, 0), [9, 7, None, None])
    monkeypatch.setattr(triton_lora, "add_lora_linear", lambda *a, **k: pytest.fail("launched"))
    out = torch.randn(3, 40)
    wrapper.add_lora_linear(out, torch.randn(3, 32), (torch.zeros(4, 1, 16, 32),) * 3,
                            tuple(torch.zeros(4, 1, w, 16) for w in (24, 8, 8)), 1.0, (24, 8, 8))


def test_staging_never_replaces_a_folder_it_did_not_make(tmp_path):
    """A mistyped --stage path (the repository, a home folder) is refused, not emptied."""
    from loraplex.kernels import bench_gpu

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "work.txt").write_text("keep")
    with pytest.raises(SystemExit, match="not a staged benchmark folder"):
        bench_gpu.stage(precious)
    assert (precious / "work.txt").read_text() == "keep"
    staged = tmp_path / "stage"
    bench_gpu.stage(staged)
    bench_gpu.stage(staged)  # a folder it staged is replaced
    assert (staged / "vllm" / "lora" / "ops" / "triton_ops" / "lora_shrink_op.py").is_file()
    assert (staged / "loraplex" / "kernels" / "triton_lora.py").is_file()
