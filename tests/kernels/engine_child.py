"""Child process of test_gpu_wrapper_engine: one in-process vLLM engine on CPU over a tiny model
with LoRA, greedy tokens for every (prompt, adapter) in one batch, written as JSON.

    python -m tests.kernels.engine_child MODEL_DIR OUT.json WRAPPER ADAPTER_DIR...

WRAPPER: ``gpu`` (our CUDA punica wrapper, its Triton ops in the interpreter), ``cpu`` (ours, CPU
ops) or ``stock`` (vLLM's CPU wrapper); ``cpu-churn``: ours (with the compiled op where it is
built) on 2 slots for more adapters, each round's batch taking the adapters in turns, so vLLM
rewrites slots between steps (tokens of every round, in order); ``cpu-bf16-adapters``: ours
with the compiled op, the adapters stored in bfloat16 (``--lora-dtype bfloat16``) under the
float32 model (``{"lora_dtype": ..., "tokens": [...]}``)."""

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

    churn = wrapper == "cpu-churn"
    if wrapper in ("cpu-churn", "cpu-bf16-adapters"):
        os.environ[vllm_plugin.COMPILED_OPS_ENV] = os.environ["ENGINE_CHILD_COMPILED_OPS_DIR"]
    qualname = {"gpu": vllm_plugin.GPU_WRAPPER, "cpu": vllm_plugin.CPU_WRAPPER, "cpu-churn": vllm_plugin.CPU_WRAPPER,
                "cpu-bf16-adapters": vllm_plugin.CPU_WRAPPER, "stock": vllm_plugin.STOCK_CPU_WRAPPER}[wrapper]
    CpuPlatform.get_punica_wrapper = classmethod(lambda cls: qualname)
    prompts = json.loads(os.environ["ENGINE_CHILD_PROMPTS"])
    max_tokens = int(os.environ["ENGINE_CHILD_MAX_TOKENS"])
    # One slot more than adapters: stock vLLM-CPU applies the last slot's adapter to no-adapter
    # tokens when every slot is full (README, "Kernels"); an empty last slot adds zero.
    slots = 2 if churn else 3
    llm = LLM(model=model_dir, skip_tokenizer_init=True, dtype="float32", enable_lora=True, max_loras=slots,
              max_lora_rank=8, max_cpu_loras=slots, max_model_len=128, max_num_batched_tokens=128,
              lora_dtype="bfloat16" if wrapper == "cpu-bf16-adapters" else "auto",
              kv_cache_memory_bytes=64 << 20, enforce_eager=True, seed=0)
    loras = [None] + [LoRARequest(f"a{i}", i + 1, path) for i, path in enumerate(adapter_dirs)]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False)

    def run(batch):
        outputs = llm.generate([{"prompt_token_ids": prompt} for prompt, _ in batch], params,
                               lora_request=[lora for _, lora in batch], use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs]

    batch = [(prompt, lora) for prompt in prompts for lora in loras]
    if not churn:
        tokens = run(batch)
    else:  # each round: one request per (prompt, adapter) in a rotated order, a pair of adapters at a time
        tokens = []
        for turn in range(3):
            order = loras[1:][turn:] + loras[1:][:turn]
            for first in range(0, len(order), 2):
                pair = [None, *order[first:first + 2]]
                tokens.append({f"{p}:{loras.index(lora)}": t for (p, lora), t in zip(
                    [(i, lora) for i in range(len(prompts)) for lora in pair],
                    run([(prompt, lora) for prompt in prompts for lora in pair]))})
    if wrapper == "cpu-bf16-adapters":  # and the dtype vLLM stored them in
        tokens = {"lora_dtype": str(llm.llm_engine.vllm_config.lora_config.lora_dtype), "tokens": tokens}
    with open(out_path, "w") as f:
        json.dump(tokens, f)


if __name__ == "__main__":
    main()
