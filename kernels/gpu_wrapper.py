"""loraplex's CUDA punica wrapper: vLLM's ``PunicaWrapperGPU`` with our Triton ops for the linear,
embedding and lm_head LoRA layers. Per-step metadata lives in buffers preallocated at their
maximum size and filled in place (``triton_lora.MetaBuffers``), scratch space too, so the ops can
be captured in a CUDA graph and replayed on new metadata. Imported by vLLM by qualified name
(``vllm_plugin.GPU_WRAPPER``); importing it imports vLLM. Runs on CPU under TRITON_INTERPRET=1
for the tests."""

from __future__ import annotations

import dataclasses

import torch
from vllm.lora.punica_wrapper.punica_base import PunicaWrapperBase
from vllm.lora.punica_wrapper.punica_gpu import PunicaWrapperGPU
from vllm.triton_utils import HAS_TRITON

from . import triton_lora


class LoraplexPunicaWrapperGPU(PunicaWrapperGPU):
    """vLLM's CUDA punica wrapper with loraplex's Triton ops (fused MoE LoRA stays vLLM's)."""

    def __init__(self, max_num_batched_tokens: int, max_batches: int, device, **kwargs) -> None:
        if HAS_TRITON:  # vLLM's own metadata, for the ops left to it (fused MoE LoRA)
            PunicaWrapperGPU.__init__(self, max_num_batched_tokens, max_batches, device, **kwargs)
        else:  # vLLM found no usable Triton backend (CPU tests run ours in the interpreter)
            PunicaWrapperBase.__init__(self, max_num_batched_tokens, max_batches, device)
            self.lora_config = kwargs["lora_config"]
            self.max_loras = self.lora_config.max_loras
        self._vllm_meta = HAS_TRITON
        max_rank = self.lora_config.max_lora_rank
        self._token_meta_buffers = triton_lora.MetaBuffers(self.max_loras, max_num_batched_tokens, device)
        self._sampler_meta_buffers = triton_lora.MetaBuffers(self.max_loras, max_batches, device)
        self._token_meta = self._token_meta_buffers.fill(torch.empty(0, dtype=torch.long, device=device))
        self._sampler_meta = self._sampler_meta_buffers.fill(torch.empty(0, dtype=torch.long, device=device))
        self._has_lora = False  # from the host-side mapping: no device read
        self._cuda = torch.cuda.is_available()
        # Shrink results and split-K partial sums for the largest step, reused by every layer.
        split_k = triton_lora.max_split_k(max_rank, triton_lora.device_name(device))
        rows = max(max_num_batched_tokens, max_batches)
        self._buffer = torch.empty(triton_lora.MAX_SLICES, rows, max_rank, dtype=torch.float32, device=device)
        self._partials = torch.empty(split_k, triton_lora.MAX_SLICES, rows, max_rank, dtype=torch.float32,
                                     device=device)

    def update_metadata(self, mapping, lora_index_to_id, max_loras, vocab_size, **kwargs) -> None:
        if self._vllm_meta:
            super().update_metadata(mapping, lora_index_to_id, max_loras, vocab_size, **kwargs)
        else:
            self.is_prefill = mapping.is_prefill
            self._update_base_metadata(mapping, lora_index_to_id, max_loras, vocab_size)
        self._token_meta = self._token_meta_buffers.fill(self.token_lora_indices)
        self._sampler_meta = self._sampler_meta_buffers.fill(self.sampler_indices)
        self._has_lora = any(adapter_id > 0 for adapter_id in mapping.index_mapping)

    def _skip(self) -> bool:
        """No token has an adapter (known on the host). Never skipped while a graph is captured:
        the graph must hold the launches (they exit at once on empty segments)."""
        return not self._has_lora and not (self._cuda and torch.cuda.is_current_stream_capturing())

    def _meta(self, meta: triton_lora.TritonLoraMeta, num_rows: int) -> triton_lora.TritonLoraMeta:
        """The launch bound is the layer's row count (a shape: fixed in a captured graph)."""
        return meta if meta.max_segment_len == num_rows else dataclasses.replace(meta, max_segment_len=num_rows)

    def add_shrink(self, y, x, lora_a_stacked, scale, **kwargs):
        if self._skip():
            return y
        x = x.view(-1, x.shape[-1])
        triton_lora.lora_shrink(self._meta(self._token_meta, x.shape[0]), x, lora_a_stacked, y, scale,
                                partials=self._partials)
        return y

    def add_expand(self, y, x, lora_b_stacked, output_slices, offset_start=0, add_inputs=True, **kwargs):
        if self._skip():
            return y
        out = y.view(-1, y.shape[-1])
        triton_lora.lora_expand(self._meta(self._token_meta, out.shape[0]), x, lora_b_stacked, out, output_slices,
                                offset_start, add_inputs)
        return y

    def add_lora_embedding(self, y, x, lora_b_stacked, add_inputs=True, **kwargs):
        if self._skip():
            return y
        out = y.view(-1, y.shape[-1])
        triton_lora.lora_expand(self._meta(self._token_meta, out.shape[0]), x.unsqueeze(0), [lora_b_stacked], out,
                                [lora_b_stacked.shape[-2]], 0, add_inputs)
        return y

    def add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *, buffer=None,
                        **kwargs):
        if self._skip():
            return y
        x = x.view(-1, x.shape[-1])
        triton_lora.add_lora_linear(self._meta(self._token_meta, x.shape[0]), y.view(-1, y.shape[-1]), x,
                                    lora_a_stacked, lora_b_stacked, scale, output_slices,
                                    add_inputs=kwargs.get("add_inputs", True), buffer=self._buffer,
                                    partials=self._partials)
        return y

    def add_lora_logits(self, y, x, lora_a_stacked, lora_b_stacked, scale, *, buffer=None, **kwargs):
        """lm_head LoRA over the sampled rows (the sampler's metadata)."""
        if self._skip():
            return y
        x = x.view(-1, x.shape[-1])
        width = min(lora_b_stacked.shape[-2], y.shape[-1])
        triton_lora.add_lora_linear(self._meta(self._sampler_meta, x.shape[0]), y.view(-1, y.shape[-1]), x,
                                    [lora_a_stacked], [lora_b_stacked[..., :width, :]], scale, [width],
                                    buffer=self._buffer, partials=self._partials)
        return y
