"""End to end without a GPU: vLLM's engine (CPU) with our CUDA punica wrapper, its Triton ops run
by the interpreter, on a tiny random Llama with two peft adapters and no-adapter requests in the
same batches: greedy tokens identical to vLLM's stock CPU ops, to ours, and to HF+peft."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loraplex.loadtest.adapters import make_adapter

PROMPTS = [[5, 17, 99, 3, 42, 7, 250, 31], [200, 1, 2, 3], [77] * 20]
MAX_TOKENS = 6
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A 2-layer Llama with random weights, written here (no hub), and two adapters on it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).float()
    with torch.no_grad():  # larger weights than the init's: well-separated logits, no near-ties
        for param in model.parameters():
            param.mul_(4.0)
    model.save_pretrained(root / "model", safe_serialization=True)
    adapters = [make_adapter(model, root / f"adapter-{i}", seed=i, rank=8, b_std=0.5) for i in range(2)]
    return root / "model", adapters, model


def engine_tokens(model_dir: Path, adapters, wrapper: str, out: Path, prompts=PROMPTS):
    env = {**os.environ, "ENGINE_CHILD_PROMPTS": json.dumps(prompts), "ENGINE_CHILD_MAX_TOKENS": str(MAX_TOKENS),
           "ENGINE_CHILD_COMPILED_OPS_DIR": str(out.parent / "compiled-ops")}
    subprocess.run([sys.executable, "-m", "tests.kernels.engine_child", str(model_dir), str(out), wrapper,
                    *map(str, adapters)], check=True, cwd=ROOT, env=env, timeout=600,
                   stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def hf_peft_tokens(model, adapters, prompts=PROMPTS) -> list[list[int]]:
    from peft import PeftModel

    results = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        for adapter in [None, *adapters]:
            with torch.no_grad():
                if adapter is None:
                    out = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0)
                else:
                    peft_model = PeftModel.from_pretrained(model, adapter).eval()
                    out = peft_model.generate(input_ids=ids, max_new_tokens=MAX_TOKENS, do_sample=False,
                                              pad_token_id=0)
                    peft_model.unload()
            results.append(out[0, len(prompt):].tolist())
    return results


@pytest.mark.timeout(1200)
def test_cuda_wrapper_in_the_engine_matches_stock_ours_and_hf_peft(tiny_model, tmp_path):
    model_dir, adapters, model = tiny_model
    expected = hf_peft_tokens(model.eval(), adapters)
    assert len({tuple(t) for t in expected}) > 1, "the adapters must change the output"
    for wrapper in ("gpu", "stock", "cpu"):
        assert engine_tokens(model_dir, adapters, wrapper, tmp_path / f"{wrapper}.json") == expected, wrapper


@pytest.mark.timeout(1200)
def test_slots_rewritten_between_steps_serve_each_adapter_its_own_weights(tiny_model, tmp_path):
    """Four adapters taking turns on two slots (vLLM rewrites a slot, and our caches refresh just
    that slot, between steps), short runs on the compiled op and a long prompt on the torch ops:
    every round's tokens equal HF+peft's for that adapter."""
    model_dir, adapters, model = tiny_model
    adapters = [*adapters, *(make_adapter(model, tmp_path / f"extra-{i}", seed=10 + i, rank=8, b_std=0.5)
                             for i in range(2))]
    prompts = [*PROMPTS, list(range(3, 83))]  # 80 tokens: a run the torch ops take
    expected = hf_peft_tokens(model.eval(), adapters, prompts)
    per_request = {f"{p}:{a}": expected[p * (len(adapters) + 1) + a]
                   for p in range(len(prompts)) for a in range(len(adapters) + 1)}
    assert len({tuple(t) for t in expected}) > len(prompts), "the adapters must change the output"
    batches = engine_tokens(model_dir, adapters, "cpu-churn", tmp_path / "churn.json", prompts)
    assert len(batches) == 6 and all(len(batch) == 3 * len(prompts) for batch in batches)
    for batch in batches:
        assert batch == {key: per_request[key] for key in batch}


@pytest.mark.timeout(1200)
def test_adapters_stored_in_bfloat16_under_a_float32_model(tiny_model, tmp_path):
    """``--lora-dtype bfloat16`` under a float32 model: vLLM stores the adapters in bf16 and our
    wrapper hands them to the compiled op as stored (a long prompt's run too). With weights bf16
    holds exactly (and a power-of-two scale, which vLLM folds into B exactly) only the storage
    changes, not the arithmetic: HF+peft's float32 tokens, request for request."""
    from safetensors.torch import load_file, save_file

    model_dir, _, model = tiny_model
    adapters = []
    for i in range(2):
        adapter = make_adapter(model, tmp_path / f"bf16-exact-{i}", seed=20 + i, rank=8, b_std=0.5)
        weights_file = adapter / "adapter_model.safetensors"
        save_file({name: w.bfloat16().float() for name, w in load_file(weights_file).items()}, weights_file)
        adapters.append(adapter)
    prompts = [*PROMPTS, list(range(3, 83))]
    expected = hf_peft_tokens(model.eval(), adapters, prompts)
    assert len({tuple(t) for t in expected}) > len(prompts), "the adapters must change the output"
    served = engine_tokens(model_dir, adapters, "cpu-bf16-adapters", tmp_path / "bf16.json", prompts)
    assert served["lora_dtype"] == "torch.bfloat16" and served["tokens"] == expected
