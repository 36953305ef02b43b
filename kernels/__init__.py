"""loraplex batched-LoRA ops: a pure-torch reference, a fast CPU path, Triton for GPUs,
and the vLLM plugin that installs them (``loraplex.kernels.vllm_plugin``).

Not to be confused with Hugging Face's ``kernels`` hub package: this package exposes none of
its API (``get_kernel`` ...), and transformers must never take it for that one.
"""
