"""Child process of test_gpu_wrapper_engine: one in-process vLLM engine on CPU over a tiny model
with LoRA, greedy tokens for every (prompt, adapter) in one batch, written as JSON.

    python -m tests.kernels.engine_child MODEL_DIR OUT.json WRAPPER ADAPTER_DIR...

WRAPPER: ``gpu`` (our CUDA punica wrapper, its Triton ops in the interpreter), ``cpu`` (ours, CPU
ops) or ``stock`` (vLLM's CPU wrapper)."""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    model_dir, out_path, wrapper, *adapter_dirs = sys.argv[1:]
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the patch below reaches the worker
    os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    os.environ["TRITON_INTERPRET"] = "1"
    from loraplex.kernels import vllm_plugin

    vllm_plugin.select_lora_kernels("vllm")  # the plugin leaves the platform alone; we choose here
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest
    from vllm.platforms.cpu import CpuPlatform

    qualname = {"gpu": vllm_plugin.GPU_WRAPPER, "cpu": vllm_plugin.CPU_WRAPPER,
                "stock": vllm_plugin.STOCK_CPU_WRAPPER}[wrapper]
    CpuPlatform.get_punica_wrapper = classmethod(lambda cls: qualname)
    prompts = json.loads(os.environ["ENGINE_CHILD_PROMPTS"])
    max_tokens = int(os.environ["ENGINE_CHILD_MAX_TOKENS"])
    # One slot more than adapters: stock vLLM-CPU applies the last slot's adapter to no-adapter
    # tokens when every slot is full (README, "Kernels"); an empty last slot adds zero.
    llm = LLM(model=model_dir, skip_tokenizer_init=True, dtype="float32", enable_lora=True, max_loras=3,
              max_lora_rank=8, max_cpu_loras=3, max_model_len=128, max_num_batched_tokens=128,
              kv_cache_memory_bytes=64 << 20, enforce_eager=True, seed=0)
    loras = [None] + [LoRARequest(f"a{i}", i + 1, path) for i, path in enumerate(adapter_dirs)]
    batch = [(prompt, lora) for prompt in prompts for lora in loras]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
    outputs = llm.generate([{"prompt_token_ids": prompt} for prompt, _ in batch], params,
                           lora_request=[lora for _, lora in batch], use_tqdm=False)
    with open(out_path, "w") as f:
        json.dump([list(o.outputs[0].token_ids) for o in outputs], f)


if __name__ == "__main__":
    main()
