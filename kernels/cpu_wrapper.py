"""loraplex's CPU punica wrapper: vLLM's ``PunicaWrapperCPU`` with our grouped ops for every
LoRA layer. Imported by vLLM (by qualified name, see ``vllm_plugin.CPU_WRAPPER``) in the
processes that run the model; importing it imports vLLM."""

from __future__ import annotations

import torch
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

from . import cpu_lora, native, vllm_plugin
from .reference import as_3d

# Steps made only of short runs (decode: one token per sequence), with at most this many tokens,
# and at most COMPILED_MAX_TOKENS_PER_SLOT on any one slot, run the compiled op: one call per
# layer, each token reading its own slot's weights. Past those the grouped torch ops, which read
# a slot's weights once for all its tokens, catch up (bench_ops: level at ~48 tokens on one slot;
# the compiled op still 2-3x ahead at 128 tokens over 16 or more slots).
COMPILED_MAX_TOKENS = 128
COMPILED_MAX_TOKENS_PER_SLOT = 32


class LoraplexPunicaWrapperCPU(PunicaWrapperCPU):
    """vLLM's CPU punica wrapper with loraplex's grouped ops for every linear layer.

    The token -> slot plan is built once per step in :meth:`update_metadata`; the layers'
    calls (``add_shrink``, ``add_expand``, ``add_lora_linear``) reuse it. Small steps' linear
    layers run the compiled op (``native``) when it was built for this machine.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._plan = cpu_lora.build_plan(torch.empty(0, dtype=torch.long))
        self._compute = cpu_lora.ComputeWeights(enabled=not cpu_lora.native_bf16_matmul())
        self._workspace = cpu_lora.Workspace()
        # Each layer's A slices concatenated along the rank (one shrink for q/k/v or gate/up).
        self._fused_lora_a = cpu_lora.PerTensorCache(
            lambda slices: cpu_lora.fuse_slices(slices, self._compute.dtype))
        # Each layer's B slices as [S, N_i, R] in the compute dtype.
        self._lora_b = cpu_lora.PerTensorCache(lambda slices: [as_3d(self._compute(b)) for b in slices])
        cache = vllm_plugin.compiled_ops_cache()
        self._compiled = native.load(cache, build_if_missing=False) if cache is not None else None
        self._compiled_slots: torch.Tensor | None = None  # this step's token slots when it runs the compiled op
        # Slots whose B is not all zero, per stacked B buffer (lm_head and embedding LoRA).
        self._slots_with_weights = cpu_lora.PerTensorCache(
            lambda b: torch.nonzero(b.reshape(b.shape[0], -1).abs().amax(dim=1) > 0).flatten().tolist())

    def update_metadata(self, *args, **kwargs) -> None:
        super().update_metadata(*args, **kwargs)
        self._plan = cpu_lora.build_plan(self.token_lora_indices)
        self._compiled_slots = self.token_lora_indices if self._runs_compiled(self._plan) else None

    def _runs_compiled(self, plan: cpu_lora.LoraPlan) -> bool:
        if self._compiled is None or not plan.has_lora or plan.direct_segments:
            return False
        most_on_one_slot = max((end - start for start, end, _ in plan.gathered_segments), default=0)
        return (plan.num_gathered <= COMPILED_MAX_TOKENS and most_on_one_slot <= COMPILED_MAX_TOKENS_PER_SLOT)

    def add_shrink(self, y, x, lora_a_stacked, scale, **kwargs):
        x = x.view(-1, x.shape[-1])
        for i, lora_a in enumerate(lora_a_stacked):
            cpu_lora.lora_shrink(self._plan, x, self._compute(lora_a), y[i].view(-1, y[i].shape[-1]), scale,
                                 workspace=self._workspace)
        return y

    def add_expand(self, y, x, lora_b_stacked, output_slices, offset_start=0, add_inputs=True, **kwargs):
        out = y.view(-1, y.shape[-1])
        offset = offset_start
        for i, lora_b in enumerate(lora_b_stacked):
            cpu_lora.lora_expand(self._plan, x[i], self._compute(lora_b), out, offset, add_inputs,
                                 workspace=self._workspace)
            offset += output_slices[i]
        return y

    def add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *, buffer=None,
                        **kwargs):
        out, x = y.view(-1, y.shape[-1]), x.view(-1, x.shape[-1])
        if self._compiled_slots is not None and x.dtype == out.dtype:
            self._compiled.add_lora_linear(out, x, self._compiled_slots, self._fused_lora_a(lora_a_stacked),
                                           self._lora_b(lora_b_stacked), scale, 0)
        else:
            cpu_lora.add_lora_linear(self._plan, out, x, lora_a_stacked, self._lora_b(lora_b_stacked), scale,
                                     output_slices, workspace=self._workspace,
                                     fused_lora_a=self._fused_lora_a(lora_a_stacked))
        return y

    def add_lora_embedding(self, y, x, lora_b_stacked, add_inputs=True, **kwargs):
        """Embedding LoRA (``x`` holds each token's row of its adapter's embedding A). Skipped for
        slots whose B is all zero: adapters without embedding weights, the common case."""
        plan = self._plan_for_slots_with_weights(self.token_lora_indices, lora_b_stacked)
        if plan is not None:
            cpu_lora.lora_expand(plan, x.view(-1, x.shape[-1]), self._compute(lora_b_stacked),
                                 y.view(-1, y.shape[-1]), 0, add_inputs, workspace=self._workspace)
        elif not add_inputs:
            y.zero_()
        return y

    def add_lora_logits(self, y, x, lora_a_stacked, lora_b_stacked, scale, *, buffer=None, **kwargs):
        """lm_head LoRA over the sampled tokens. Slots whose lm_head B is all zero (adapters
        that do not target lm_head: the common case) are skipped, so it usually costs nothing."""
        plan = self._plan_for_slots_with_weights(self.sampler_indices, lora_b_stacked)
        if plan is None:
            return y
        y2 = y.view(-1, y.shape[-1])
        width = min(lora_b_stacked.shape[-2], y2.shape[-1])
        cpu_lora.add_lora_linear(plan, y2, x.view(-1, x.shape[-1]),
                                 [self._compute(lora_a_stacked)], [self._compute(lora_b_stacked)[..., :width, :]],
                                 scale, [width], workspace=self._workspace)
        return y

    def _plan_for_slots_with_weights(self, slots, lora_b_stacked):
        """A plan over the tokens whose slot has a non-zero B in ``lora_b_stacked`` (None: no slot has one)."""
        active = self._slots_with_weights(lora_b_stacked)
        if not active:
            return None
        with_weights = torch.isin(slots, torch.tensor(active, dtype=slots.dtype))
        return cpu_lora.build_plan(torch.where(with_weights, slots, -1))
