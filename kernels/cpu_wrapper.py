"""loraplex's CPU punica wrapper: vLLM's ``PunicaWrapperCPU`` with our grouped ops for every
LoRA layer. Imported by vLLM (by qualified name, see ``vllm_plugin.CPU_WRAPPER``) in the
processes that run the model; importing it imports vLLM."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

from . import cpu_lora, native, slot_writes, vllm_plugin
from .reference import NO_ADAPTER, as_3d

# Which tokens of a step the compiled op takes (``kernels/bench_ops.py``, ``bench_step_op.py
# --runs`` and the README's "Kernels"): those in runs shorter than COMPILED_MIN_TORCH_RUN
# consecutive tokens on one slot (decode tokens, short prefills: it is 2-10x faster there), when
# there are at most COMPILED_MAX_TOKENS of them and at most COMPILED_MAX_TOKENS_PER_SLOT on any one
# slot. Longer runs go to the torch ops, which multiply a run in place: each of their ~600 calls a
# step costs 30-50 us of fixed overhead, but on bfloat16 the AVX2 build widens every element and
# they overtake it at ~160 tokens on one core, ~280 on two. These limits apply to bfloat16 (and
# float16) steps on builds other than COMPILED_EVERY_RUN_BF16_VARIANTS.
COMPILED_MIN_TORCH_RUN = 128
COMPILED_MAX_TOKENS = 256
COMPILED_MAX_TOKENS_PER_SLOT = 128
# Where the compiled op takes every token of a step, whatever its runs' lengths: activations and
# weights in float32, with any build (1.2-1.6x ahead of the torch ops from 128 to 2048 tokens on
# one adapter, one and two cores), or float32 activations with weights stored in bf16/fp16
# (``--lora-dtype``: widened as they are read, 64-256 tokens within 4% of float32 weights' time);
# and in bfloat16 with the builds below, which multiply bf16 pairs in both halves of the op
# (ahead at 1-4096 tokens).
COMPILED_EVERY_RUN_BF16_VARIANTS = ("avx512bf16",)


def slot_bits(slots) -> int:
    """``slots`` as one int, bit ``s`` set for slot ``s`` (a negative slot, which no step should
    hold, sets every bit: whatever reads it runs, and the op refuses the slot)."""
    bits = 0
    for slot in slots:
        bits |= 1 << slot if slot >= 0 else -1
    return bits


@dataclass(slots=True)
class LinearLayer:
    """What ``add_lora_linear`` needs of one LoRA linear layer, valid while its weights'
    version counters are ``versions`` (vLLM writes a slot in place: the counters move)."""

    lora_a_stacked: tuple  # the layer's A slices, [S, 1, R, H] each, as vLLM passes them
    lora_b_stacked: tuple  # its B slices, [S, 1, N_i, R] each
    weights: tuple  # both, flat
    versions: list[int]
    # The compiled op's hold on the A slices fused, [S, R_total, H], and B transposed per slice,
    # [S, R, N_i], both in the weights' own dtype (checked once; None: the op has not run this
    # layer yet), and the op module that made it.
    compiled_layer: object | None
    compiled_by: object | None
    # Bit s set: slot s holds weights here (a slot past the buffers counts as holding them)
    slot_bits: int
    # The activation dtypes of steps whose every token the compiled op takes
    every_run_dtypes: frozenset


class LoraplexPunicaWrapperCPU(PunicaWrapperCPU):
    """vLLM's CPU punica wrapper with loraplex's grouped ops for every linear layer.

    The token -> slot plan is built once per step in :meth:`update_metadata`; the layers'
    calls (``add_shrink``, ``add_expand``, ``add_lora_linear``) reuse it. In the linear layers the
    tokens of short runs (decode, short prefills) go to the compiled op (``native``) when it was
    built for this machine, long runs to the torch ops (in float32, and with the AVX512-BF16 build
    in bfloat16, every token to the compiled op).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._token_slots = torch.empty(0, dtype=torch.long)
        self._plan = cpu_lora.build_plan(self._token_slots)
        # vLLM rewrites one slot when it activates an adapter; the caches below refresh that slot only.
        self._slot_writes = slot_writes.SlotWrites()
        slot_writes.install_activation_hook()
        self._compute = cpu_lora.ComputeWeights(enabled=not cpu_lora.native_bf16_matmul(),
                                                slot_writes=self._slot_writes)
        self._workspace = cpu_lora.Workspace()
        # Each layer's A slices concatenated along the rank (one shrink for q/k/v or gate/up), in
        # the weights' own dtype: the compiled op widens low-precision weights as it reads them
        # (exactly: the same products as from float copies, from half the bytes); the torch ops
        # take it through ``_compute`` (its float copy where the CPU lacks native bf16).
        self._fused_lora_a = cpu_lora.PerTensorCache(
            lambda slices: cpu_lora.fuse_slices(slices), self._slot_writes, copies=cpu_lora.fused_slice_copies)
        # Each layer's B slices as [S, N_i, R] in the compute dtype, and transposed, [S, R, N_i]
        # contiguous in their own dtype, for the compiled op (made the first time it runs that layer).
        # (views of the weights or of ``_compute``'s float copies, which refresh the written slot
        # themselves: remaking the views is all a write costs here)
        self._lora_b = cpu_lora.PerTensorCache(lambda slices: [as_3d(self._compute(b)) for b in slices])
        self._lora_b_t = cpu_lora.PerTensorCache(
            lambda slices: [as_3d(b).transpose(1, 2).contiguous() for b in slices], self._slot_writes,
            copies=lambda slices, value: list(zip(value, (as_3d(b).transpose(1, 2) for b in slices))))
        cache = vllm_plugin.compiled_ops_cache()
        self._compiled = native.load(cache, build_if_missing=False) if cache is not None else None
        # The dtypes in which the compiled op takes every token: float32 (activations, whatever the
        # weights' dtype: ``--lora-dtype`` may store them lower), and with the builds above bfloat16
        # (activations and weights alike; each layer's record says which apply to it).
        self._compiled_every_run_dtypes = {torch.float32} | (
            {torch.bfloat16} if getattr(self._compiled, "variant", None) in COMPILED_EVERY_RUN_BF16_VARIANTS else set())
        # This step's linear layers: the token slots the compiled op takes (None: it does not run)
        # and the plan left for the torch ops (None: nothing left; a step with prefill runs and
        # decode tokens splits, the runs in place in torch, the decode tokens compiled).
        self._compiled_slots: torch.Tensor | None = None
        self._torch_plan: cpu_lora.LoraPlan | None = self._plan
        # Whether each slot's B is not all zero, [S] bool, per stacked B buffer (lm_head and embedding LoRA).
        self._slot_has_weights = cpu_lora.PerTensorCache(
            lambda b: b.reshape(b.shape[0], -1).abs().amax(dim=1) > 0, self._slot_writes)
        # Per linear layer (its tuple of B slices): which slots hold weights there, [S] bool, and
        # whether the current plan's slots do. An adapter that does not target a layer (PEFT's
        # default for Llama is q_proj and v_proj alone) has zeros in its slot there; a step whose
        # adapters all leave a layer alone skips that layer's call. (A slot counts as holding
        # weights when any element is not zero, NaN included: a broken adapter still shows.)
        self._layer_slots_with_weights = cpu_lora.PerTensorCache(
            lambda slices: torch.stack([b.reshape(b.shape[0], -1).ne(0).any(dim=1) for b in slices]).any(dim=0),
            self._slot_writes)
        # Per linear layer (keyed by id of its B slices): what its calls need, checked by one
        # compare of its weights' version counters a call (see LinearLayer).
        self._linear_layers: dict[int, LinearLayer] = {}
        # This step's slots as bits (1 << slot), to test against a layer's slots with weights.
        self._step_slot_bits = 0

    def note_slot_written(self, slot: int) -> None:
        """vLLM wrote adapter weights into ``slot`` (-1: into some slot it could not say)."""
        self._slot_writes.written(slot)

    def update_metadata(self, *args, **kwargs) -> None:
        super().update_metadata(*args, **kwargs)
        self._token_slots = self.token_lora_indices  # [T] int64, this step's (a view: made once a step)
        self._plan = cpu_lora.build_plan(self._token_slots)
        self._step_slot_bits = slot_bits(self._plan.slots)
        self._compiled_slots, self._torch_plan = self._split_for_compiled(self._plan, self._token_slots)

    def _split_for_compiled(self, plan: cpu_lora.LoraPlan, token_slots: torch.Tensor):
        """(slots for the compiled op, plan for the torch ops) of a step whose full plan is
        ``plan``: tokens in short runs go to the compiled op when there are few enough; long runs
        stay with the torch ops."""
        if self._compiled is None or not plan.has_lora:
            return None, plan
        split = cpu_lora.build_plan(token_slots, min_direct_run=COMPILED_MIN_TORCH_RUN)
        most_on_one_slot = max((end - start for start, end, _ in split.gathered_segments), default=0)
        if (split.gather is None or split.num_gathered > COMPILED_MAX_TOKENS
                or most_on_one_slot > COMPILED_MAX_TOKENS_PER_SLOT):
            return None, plan
        if not split.direct_segments:
            return token_slots, None
        short_run_slots = token_slots.clone()
        for start, end, _ in split.direct_segments:
            short_run_slots[start:end] = NO_ADAPTER
        return short_run_slots, cpu_lora.LoraPlan(num_tokens=split.num_tokens,
                                                  slots=tuple(sorted({slot for *_, slot in split.direct_segments})),
                                                  direct_segments=split.direct_segments)

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

    def _linear_layer(self, lora_a_stacked, lora_b_stacked) -> LinearLayer:
        """The layer's record, remade when any of its weights was written since (the caches it
        reads refresh only the written slots)."""
        layer = self._linear_layers.get(id(lora_b_stacked))
        if (layer is not None and layer.lora_b_stacked is lora_b_stacked and layer.lora_a_stacked is lora_a_stacked
                and [t._version for t in layer.weights] == layer.versions):
            return layer
        weights = (*lora_a_stacked, *lora_b_stacked)
        versions = [t._version for t in weights]  # (before reading them: a write during the reads shows next call)
        slots_with_weights = self._layer_slots_with_weights(lora_b_stacked).tolist()
        weights_dtype = lora_a_stacked[0].dtype
        layer = LinearLayer(
            lora_a_stacked=lora_a_stacked, lora_b_stacked=lora_b_stacked, weights=weights, versions=versions,
            compiled_layer=None, compiled_by=None,
            # (a slot past the mask cannot be judged: its bit is set, it runs, and the op refuses it)
            slot_bits=slot_bits(slot for slot, has in enumerate(slots_with_weights) if has)
            | -(1 << len(slots_with_weights)),
            every_run_dtypes=frozenset({torch.float32} | ({weights_dtype} & self._compiled_every_run_dtypes)))
        if len(self._linear_layers) >= cpu_lora.PerTensorCache.MAX_ENTRIES:
            self._linear_layers.clear()
        self._linear_layers[id(lora_b_stacked)] = layer
        return layer

    def add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *, buffer=None,
                        **kwargs):
        # No token of this step has an adapter, or none of their adapters targets this layer.
        # (called 120 times a step: one record, one version compare, no views that are not needed)
        if not self._step_slot_bits:
            return y
        layer = self._linear_layer(lora_a_stacked, lora_b_stacked)
        if not layer.slot_bits & self._step_slot_bits:
            return y
        out = y if y.dim() == 2 else y.view(-1, y.shape[-1])
        x = x if x.dim() == 2 else x.view(-1, x.shape[-1])
        compiled_slots, torch_plan = None, self._plan
        if self._compiled is not None and x.dtype == out.dtype:
            if x.dtype in layer.every_run_dtypes:
                compiled_slots, torch_plan = self._token_slots, None
            elif self._compiled_slots is not None:
                compiled_slots, torch_plan = self._compiled_slots, self._torch_plan
        if compiled_slots is not None:
            compiled = self._compiled
            if layer.compiled_by is not compiled:  # the first time the op runs this layer
                layer.compiled_layer = compiled.Layer(self._fused_lora_a(lora_a_stacked),
                                                      self._lora_b_t(lora_b_stacked))
                layer.compiled_by = compiled
            compiled.add_lora_linear_layer(out, x, compiled_slots, layer.compiled_layer, scale, 0)
        if torch_plan is not None:
            cpu_lora.add_lora_linear(torch_plan, out, x, lora_a_stacked, self._lora_b(lora_b_stacked), scale,
                                     output_slices, workspace=self._workspace,
                                     fused_lora_a=self._compute(self._fused_lora_a(lora_a_stacked)))
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
        active = torch.nonzero(self._slot_has_weights(lora_b_stacked)).flatten().tolist()
        if not active:
            return None
        with_weights = torch.isin(slots, torch.tensor(active, dtype=slots.dtype))
        return cpu_lora.build_plan(torch.where(with_weights, slots, -1))
