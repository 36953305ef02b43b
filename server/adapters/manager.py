"""Loads and unloads adapters: validation -> registry -> engine, in that order."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from .registry import AdapterError, AdapterRegistry, AdapterState, AdapterVersion
from .validation import BaseModelShapes, adapter_subdirs, inspect_adapter

logger = logging.getLogger(__name__)


class AdapterLoadFailed(AdapterError):
    status = 400


class AdapterPathRejected(AdapterError):
    status = 400


class AdapterManager:
    def __init__(self, registry: AdapterRegistry, engine, max_lora_rank: int, max_cpu_loras: int,
                 adapter_dir: Path | None = None, allowed_roots: tuple[Path, ...] = (),
                 base_shapes: BaseModelShapes | None = None, metrics=None) -> None:
        self.registry = registry
        self.engine = engine
        self.max_lora_rank = max_lora_rank
        self.max_cpu_loras = max_cpu_loras
        self.adapter_dir = adapter_dir
        self.allowed_roots = tuple(root.resolve() for root in allowed_roots)
        self.base_shapes = base_shapes
        self.metrics = metrics
        self._resident: set[int] = set()

    def resolve_path(self, lora_path: str) -> Path:
        """An admin's ``lora_path``: an absolute directory, or a name relative to ``--adapter-dir``.

        With ``--allowed-adapter-roots``, the resolved directory (symlinks followed) must lie
        under one of them; a relative name must stay inside the adapter dir."""
        if not lora_path or "\x00" in lora_path:
            raise AdapterPathRejected("lora_path is empty")
        raw = Path(lora_path)
        if not raw.is_absolute():
            if self.adapter_dir is None:
                raise AdapterPathRejected("a relative lora_path needs --adapter-dir; give an absolute path")
            root = self.adapter_dir.resolve()
            resolved = (root / raw).resolve()
            if not resolved.is_relative_to(root) or resolved == root:
                raise AdapterPathRejected(f"lora_path {lora_path!r} leaves the adapter directory")
        else:
            resolved = raw.resolve()
        if self.allowed_roots and not any(resolved.is_relative_to(r) for r in self.allowed_roots):
            raise AdapterPathRejected(f"lora_path {lora_path!r} is outside the allowed adapter roots")
        if not resolved.is_dir():
            raise AdapterPathRejected(f"lora_path {lora_path!r} is not a directory")
        return resolved

    async def load(self, name: str, path: Path, *, warm: bool = True) -> AdapterVersion:
        """Validate ``path``, register it as a new version of ``name`` and (``warm``) load it into
        the engine's adapter cache. Raises an :class:`AdapterError` with a clear message on failure;
        a failure never disturbs other adapters or an existing version of this one."""
        started = time.perf_counter()
        try:
            entry = self.registry.begin_load(name, path.resolve())
        except AdapterError as exc:
            self._failed(exc)
            raise
        try:
            info = inspect_adapter(path, self.max_lora_rank, self.base_shapes)
            entry.rank, entry.target_modules = info.rank, info.target_modules
            if warm:
                await self.engine.add_adapter(entry)
        except AdapterError as exc:
            self.registry.fail_load(entry, str(exc))
            self._failed(exc)
            raise
        except Exception as exc:  # the engine's own checks (shapes, modules) reject it
            message = f"the engine rejected adapter {name!r}: {exc}"
            self.registry.fail_load(entry, message)
            self._failed(AdapterLoadFailed(message))
            raise AdapterLoadFailed(message) from exc
        if self.metrics is not None:
            self.metrics.adapter_loaded(time.perf_counter() - started)
        previous = self.registry.commit_load(entry)
        if previous is not None and previous.pinned:
            await self._pin(entry)  # a replaced pinned adapter stays pinned
        if previous is not None and previous.num_running_requests == 0 and previous.state is AdapterState.UNLOADING:
            await self.engine.remove_adapter(previous)
        logger.info("adapter %s v%d ready (rank %d, slot %d)", name, entry.version, entry.rank, entry.adapter_slot)
        return entry

    def _failed(self, exc: AdapterError) -> None:
        if self.metrics is not None:
            reason = re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__).lower()  # InvalidAdapter -> invalid_adapter
            self.metrics.adapter_load_failed(reason)

    async def refresh_metrics(self) -> None:
        if self.metrics is None:
            return
        counts: dict[str, int] = {}
        for entry in self.registry.adapters():
            counts[entry.state.value] = counts.get(entry.state.value, 0) + 1
        resident = await self.engine.resident_adapter_slots()
        gone = self._resident - resident
        evicted = gone - self.engine.removed_slots  # left the cache without us removing them: the LRU
        self.engine.removed_slots -= gone
        self._resident = resident
        self.metrics.adapter_states(counts, len(resident), evictions=len(evicted))

    async def unload(self, name: str) -> AdapterVersion:
        entry = self.registry.unregister(name)
        if self.metrics is not None:
            self.metrics.adapter_unloads.inc()
        if entry.state is AdapterState.UNLOADING and entry.num_running_requests == 0:
            await self.engine.remove_adapter(entry)
        return entry

    async def pin(self, name: str) -> AdapterVersion:
        """Keep ``name`` resident in the engine's adapter cache.

        Not vLLM's ``pin_lora``: in vLLM 0.32 that also pins the adapter into one of the
        ``--max-loras`` batch slots behind the scheduler's back, and a batch holding
        ``--max-loras`` other adapters then kills the engine (KeyError in convert_mapping; seen
        here). Instead pinned adapters are loaded now and re-touched by :meth:`keep_pinned_warm`,
        which keeps them at the recent end of the engine's LRU cache."""
        entry = self.registry.resolve(name)
        await self._pin(entry)
        return entry

    async def _pin(self, entry: AdapterVersion) -> None:
        await self.engine.add_adapter(entry)
        entry.pinned = True

    async def keep_pinned_warm(self) -> None:
        for entry in self.registry.adapters():
            if entry.pinned and entry.state is AdapterState.READY:
                await self.engine.add_adapter(entry)  # a no-op load that refreshes its LRU position

    async def load_directory(self, adapter_dir: Path, preload: tuple[str, ...] = ()) -> list[str]:
        """Load every adapter subdirectory of ``adapter_dir`` under its directory name.

        ``preload`` names first, then the others, are loaded into the engine's adapter cache until
        ``max_cpu_loras`` are resident; the rest load on their first request (the engine's LRU).
        Returns the names that failed (their errors are kept in the registry and logged)."""
        failed = []
        candidates = sorted(adapter_subdirs(adapter_dir), key=lambda p: (p.name not in preload, p.name))
        for i, path in enumerate(candidates):
            try:
                await self.load(path.name, path, warm=i < self.max_cpu_loras)
            except AdapterError as exc:
                logger.error("adapter %s not loaded: %s", path.name, exc)
                failed.append(path.name)
        return failed
