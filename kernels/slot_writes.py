"""Which adapter slots vLLM rewrote: a counter per slot, bumped by a hook on vLLM's adapter
activation, so our punica wrapper's caches (fused A, transposed B, float copies) refresh only the
slot that changed instead of every slot of every layer.

vLLM writes an adapter's weights into its slot buffers (``lora_*_stacked[slot]``) in one place:
``LoRAModelManager.activate_adapter`` (through each layer's ``reset_lora``/``set_lora``). The hook
wraps that method: after it wrote slot ``s`` it calls ``note_slot_written(s)`` on the manager's
punica wrappers that have one; if it fails part way, every slot counts as written. A cache that
sees a buffer's version counter move without any noted slot (a write this hook did not see)
rebuilds the whole buffer, so the hook can only make refreshes cheaper, never skip one.

``SlotWrites`` is plain bookkeeping (no torch); :func:`install_activation_hook` imports vLLM.
"""

from __future__ import annotations

import functools

HOOK_MARK = "_loraplex_notes_slot_writes"


class SlotWrites:
    """Per-slot write counters. ``snapshot()`` marks a point (the same object until the next
    write: callers may compare marks by identity); ``changed_since(mark)`` lists the
    slots written after it, or None when that is unknown (every slot counts as written). Asked
    once per cached buffer after a write, so the answer per mark is kept until the next write."""

    def __init__(self) -> None:
        self._writes_per_slot: list[int] = []
        self._unknown_writes = 0  # bumped when a write's slot is not known
        self._mark: tuple[int, tuple[int, ...]] = (0, ())
        self._answers: dict[tuple[int, tuple[int, ...]], list[int] | None] = {}

    def written(self, slot: int) -> None:
        if slot < 0:
            self.written_unknown()
            return
        if slot >= len(self._writes_per_slot):
            self._writes_per_slot.extend([0] * (slot + 1 - len(self._writes_per_slot)))
        self._writes_per_slot[slot] += 1
        self._moved()

    def written_unknown(self) -> None:
        self._unknown_writes += 1
        self._moved()

    def _moved(self) -> None:
        self._mark = (self._unknown_writes, tuple(self._writes_per_slot))
        self._answers.clear()

    def snapshot(self) -> tuple[int, tuple[int, ...]]:
        return self._mark

    def changed_since(self, mark: tuple[int, tuple[int, ...]]) -> list[int] | None:
        if mark in self._answers:
            return self._answers[mark]
        unknown_writes, writes_per_slot = mark
        answer = None if unknown_writes != self._unknown_writes else [
            slot for slot, writes in enumerate(self._writes_per_slot)
            if writes != (writes_per_slot[slot] if slot < len(writes_per_slot) else 0)]
        self._answers[mark] = answer
        return answer


def _notify(manager, slot: int | None) -> None:
    for wrapper in getattr(manager, "punica_wrapper_mapping", {}).values():
        note = getattr(wrapper, "note_slot_written", None)
        if note is not None:
            note(-1 if slot is None else slot)


def install_activation_hook() -> None:
    """Wrap vLLM's ``LoRAModelManager.activate_adapter`` once per process (idempotent)."""
    from vllm.lora.model_manager import LoRAModelManager

    original = LoRAModelManager.activate_adapter
    if getattr(original, HOOK_MARK, False):
        return

    @functools.wraps(original)
    def activate_adapter(self, lora_id: int) -> bool:
        try:
            wrote = original(self, lora_id)
        except BaseException:
            _notify(self, None)  # it may have written part of a slot: every slot counts as written
            raise
        if wrote:
            slot = self.lora_index_to_id.index(lora_id) if lora_id in self.lora_index_to_id else None
            _notify(self, slot)
        return wrote

    setattr(activate_adapter, HOOK_MARK, True)
    LoRAModelManager.activate_adapter = activate_adapter
