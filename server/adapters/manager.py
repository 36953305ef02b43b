"""Adapter lifecycle: validate -> snapshot -> register -> engine; leases; removal, decided here only.

A version becomes servable only after, in a worker thread, the operator's directory passed our
checks, was copied into the server's read-only snapshot store, and the copy passed our checks
again, every tensor's values, and vLLM's own loader. The engine only ever reads the snapshot.

Requests hold a :class:`Lease` on the version they resolved, from resolution (before admission)
to their end. A replaced or unloaded version is removed from the engine, and its snapshot
dropped, when its last lease ends (:meth:`AdapterManager._remove_if_idle`, the one place).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from ..engine import AdapterRejected
from .registry import AdapterError, AdapterRegistry, AdapterState, AdapterVersion, LoadCancelled
from .store import SnapshotStore
from .validation import BaseModelShapes, adapter_subdirs, check_weights, inspect_adapter, resolved_path

logger = logging.getLogger(__name__)

# Besides the linear layers, vLLM's Llama-style models take LoRA weights for these.
EMBEDDING_MODULES = frozenset({"embed_tokens", "lm_head"})


class AdapterLoadFailed(AdapterError):
    status = 400
    reason = "engine_rejected"


class AdapterPathRejected(AdapterError):
    status = 400
    reason = "path_rejected"


class AdapterFailedInEngine(AdapterError):
    """The engine refused an adapter that had passed validation: its requests fail, no others."""

    status = 503
    reason = "failed_in_engine"


class Lease:
    """A request's hold on one adapter version; :meth:`release` is idempotent."""

    def __init__(self, manager: "AdapterManager", adapter: AdapterVersion) -> None:
        self._manager = manager
        self.adapter = adapter
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._manager._end_lease(self.adapter)


@dataclass(frozen=True)
class AdapterLimits:
    """What an adapter must fit to be served."""

    max_lora_rank: int
    max_cpu_loras: int
    served_dtype: str  # the engine's dtype: weights must be finite in it once scaled
    adapter_dtype: str | None = None  # the dtype the engine stores adapter weights in (None: served_dtype)
    base_shapes: BaseModelShapes | None = None
    max_bytes: int = 2 << 30


class AdapterManager:
    def __init__(self, *, registry: AdapterRegistry, engine, store: SnapshotStore, limits: AdapterLimits,
                 adapter_dir: Path | None = None, allowed_roots: tuple[Path, ...] = (), metrics=None) -> None:
        self.registry = registry
        self.engine = engine
        self.store = store
        self.limits = limits
        self.adapter_dir = adapter_dir
        self.allowed_roots = tuple(root.resolve() for root in allowed_roots)
        self.metrics = metrics
        self._background: set[asyncio.Task] = set()

    def resolve_path(self, lora_path: str) -> Path:
        """An admin's ``lora_path``: an absolute directory, or a name relative to ``--adapter-dir``.

        With ``--allowed-adapter-roots``, the resolved directory (symlinks followed) must lie
        under one of them; a relative name must stay inside the adapter dir."""
        if not lora_path or "\x00" in lora_path:
            raise AdapterPathRejected("lora_path is empty")
        try:
            lora_path.encode("utf-8", "surrogateescape")  # what the file system can be asked about
        except UnicodeEncodeError:
            raise AdapterPathRejected("lora_path is not valid text (a lone surrogate?)") from None
        raw = Path(lora_path)
        if not raw.is_absolute():
            if self.adapter_dir is None:
                raise AdapterPathRejected("a relative lora_path needs --adapter-dir; give an absolute path")
            root = resolved_path(self.adapter_dir, AdapterPathRejected)
            resolved = resolved_path(root / raw, AdapterPathRejected)
            if not resolved.is_relative_to(root) or resolved == root:
                raise AdapterPathRejected(f"lora_path {lora_path!r} leaves the adapter directory")
        else:
            resolved = resolved_path(raw, AdapterPathRejected)
        if self.allowed_roots and not any(resolved.is_relative_to(r) for r in self.allowed_roots):
            raise AdapterPathRejected(f"lora_path {lora_path!r} is outside the allowed adapter roots")
        if not resolved.is_dir():
            raise AdapterPathRejected(f"lora_path {lora_path!r} is not a directory")
        return resolved

    # -- loading ----------------------------------------------------------------------------------
    async def load_lora_path(self, name: str, lora_path: str) -> AdapterVersion:
        """An admin's load (either door): :meth:`resolve_path`, in a worker thread like every file
        access while serving (a hung mount must not stall the event loop), then :meth:`load`."""
        return await self.load(name, await asyncio.to_thread(self.resolve_path, lora_path))

    async def load(self, name: str, path: Path, *, warm: bool = True) -> AdapterVersion:
        """Validate ``path``, snapshot it, register it as a new version of ``name`` and (``warm``)
        load it into the engine's adapter cache. Raises an :class:`AdapterError` with a clear
        message on failure; a failure never disturbs other adapters or a served version of this one.
        An unload of ``name`` that arrives meanwhile wins (:class:`LoadCancelled`). A load cancelled
        midway (its gRPC caller's deadline passed) leaves nothing behind: the version is failed, its
        snapshot released and the engine rid of it."""
        started = time.perf_counter()
        try:
            entry = self.registry.begin_load(name, await asyncio.to_thread(resolved_path, path, AdapterPathRejected))
        except AdapterError as exc:
            self._count_failure(exc)
            raise
        in_engine = False
        # (shielded: a cancelled load still learns what the worker thread took, and releases it)
        validation = asyncio.ensure_future(asyncio.to_thread(self._validated_snapshot, path))
        try:
            snapshot, info = await asyncio.shield(validation)
            entry.snapshot, entry.snapshot_path, entry.digest = snapshot, snapshot.path, snapshot.digest
            entry.rank, entry.target_modules = info.rank, info.target_modules
            if warm:
                in_engine = True
                await self._add_to_engine(entry)
            previous = self.registry.commit_load(entry)
        except AdapterError as exc:
            self.registry.fail_load(entry, str(exc))
            await asyncio.shield(self._take_out(entry, in_engine))  # (a cancel meanwhile does not cut it short)
            self._count_failure(exc)
            raise
        except BaseException as exc:  # cancelled, or nothing foreseen: no version is left half-loaded
            cancelled = isinstance(exc, asyncio.CancelledError)
            self.registry.fail_load(entry, "the load was cancelled before it finished" if cancelled
                                    else f"the load failed ({type(exc).__name__})")
            if entry.snapshot is None:  # what the validation took (now or later) was never handed over
                validation.add_done_callback(self._release_taken_snapshot)
            self._spawn(self._take_out(entry, in_engine))  # (its own task: a second cancel cannot cut it short)
            if not cancelled:
                logger.exception("adapter %s v%d: the load failed", name, entry.version)
            raise
        if self.metrics is not None:
            self.metrics.adapter_loaded(time.perf_counter() - started)
        if previous is not None:
            entry.pinned = entry.pinned or (previous.pinned and previous is not entry)  # stays pinned
            await self._remove_if_idle(previous)
        logger.info("adapter %s v%d ready (rank %d, slot %d, sha256 %s)", name, entry.version, entry.rank,
                    entry.adapter_slot, entry.digest[:12])
        return entry

    def _release_taken_snapshot(self, validation: asyncio.Future) -> None:
        """A cancelled load's validation finished after all: drop the snapshot it took."""
        if not validation.cancelled() and validation.exception() is None:
            self._spawn(self._release_snapshot(validation.result()[0]))

    def _validated_snapshot(self, path: Path):
        """Worker thread: the source's checks (clear messages), then the snapshot's: structure,
        values, and vLLM's own loader. What is validated is exactly what the engine will read."""
        limits = self.limits
        inspect_adapter(path, limits.max_lora_rank, limits.base_shapes, limits.max_bytes)
        snapshot = self.store.take(path)
        try:
            info = inspect_adapter(snapshot.path, limits.max_lora_rank, limits.base_shapes, limits.max_bytes)
            check_weights(snapshot.path, info.scale, limits.served_dtype, limits.adapter_dtype)
            modules = set(limits.base_shapes.modules) if limits.base_shapes else set(info.target_modules)
            try:
                self.engine.check_adapter(snapshot.path, frozenset(modules | EMBEDDING_MODULES))
            except AdapterRejected as exc:
                raise AdapterLoadFailed(f"the engine's loader rejects adapter {path.name!r}: {exc}") from exc
        except BaseException:
            self.store.release(snapshot)
            raise
        return snapshot, info

    async def _add_to_engine(self, entry: AdapterVersion) -> None:
        try:
            await self.engine.add_adapter(entry)
        except AdapterRejected as exc:
            raise AdapterLoadFailed(f"the engine rejected adapter {entry.name!r}: {exc}") from exc

    def _count_failure(self, exc: AdapterError) -> None:
        if self.metrics is not None:
            self.metrics.adapter_load_failed(exc.reason)

    # -- leases -----------------------------------------------------------------------------------
    def lease(self, name: str) -> Lease:
        """Resolve ``name`` to its ready version and hold it (one step: no unload slips between)."""
        return Lease(self, self.registry.acquire(name))

    async def ensure_in_engine(self, lease: Lease) -> None:
        """Before the request is scheduled: its adapter is in the engine's cache (an explicit,
        awaited and checked load). If the engine refuses it, the adapter is marked failed and only
        its own requests fail."""
        entry = lease.adapter
        try:
            was_resident = await self.engine.ensure_adapter(entry)
            if self.metrics is not None:
                self.metrics.adapter_cache_lookup(was_resident)
        except AdapterRejected as exc:
            message = f"adapter {entry.name!r} v{entry.version} failed in the engine: {exc}"
            logger.error("%s; it is marked failed", message)
            self.registry.mark_failed(entry, message)
            failure = AdapterFailedInEngine(f"adapter {entry.name!r} failed in the engine and is out of service")
            self._count_failure(failure)
            raise failure from exc

    def _end_lease(self, entry: AdapterVersion) -> None:
        if self.registry.release(entry):
            self._spawn(self._remove_if_idle(entry))

    # -- removal ----------------------------------------------------------------------------------
    async def _remove_if_idle(self, entry: AdapterVersion) -> None:
        """The one place a served version leaves: once it is no longer served and nobody holds it."""
        if not self.registry.is_idle_and_retired(entry):
            return
        # (shielded: a caller cancelled meanwhile, a gRPC UnloadAdapter past its deadline, does not
        # cut the removal short and leave the version in the engine)
        await asyncio.shield(self._take_out(entry, in_engine=True))

    async def _take_out(self, entry: AdapterVersion, in_engine: bool) -> None:
        """A retired version, or a load that did not commit: out of the engine first (``in_engine``),
        then its snapshot, so the engine never reads a removed snapshot. Once: the version gives up
        its snapshot before anything is awaited."""
        snapshot, entry.snapshot = entry.snapshot, None
        if snapshot is None:
            return
        try:
            if in_engine:
                await self.engine.remove_adapter(entry)
        finally:
            await self._release_snapshot(snapshot)

    async def _release_snapshot(self, snapshot) -> None:
        """The store's release (removing the last user's files) in a worker thread, off the event loop."""
        await asyncio.to_thread(self.store.release, snapshot)

    async def unload(self, name: str) -> AdapterVersion:
        """Stop serving ``name``: leased requests finish on their version, loads in flight are cancelled."""
        current, cancelled = self.registry.unregister(name)
        if self.metrics is not None:
            self.metrics.adapter_unloads.inc()
        if current is None:
            return cancelled[-1]
        await self._remove_if_idle(current)
        return current

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- pinning and housekeeping -------------------------------------------------------------------
    async def pin(self, name: str) -> AdapterVersion:
        """Keep ``name`` resident in the engine's adapter cache.

        Not vLLM's ``pin_lora``: in vLLM 0.32 that also pins the adapter into one of the
        ``--max-loras`` batch slots behind the scheduler's back, and a batch holding
        ``--max-loras`` other adapters then kills the engine (KeyError in convert_mapping; seen
        here). Instead pinned adapters are loaded now and re-touched by :meth:`keep_pinned_warm`,
        which keeps them at the recent end of the engine's LRU cache."""
        entry = self.registry.resolve(name)
        await self._add_to_engine(entry)
        entry.pinned = True
        return entry

    async def keep_pinned_warm(self) -> None:
        for entry in self.registry.adapters():
            if entry.pinned and entry.state is AdapterState.READY:
                try:
                    await self.engine.add_adapter(entry)  # a no-op load that refreshes its LRU position
                except AdapterRejected as exc:
                    self.registry.mark_failed(entry, f"failed in the engine: {exc}")

    async def refresh_metrics(self) -> None:
        if self.metrics is None:
            return
        counts: dict[str, int] = {}
        for entry in self.registry.adapters():
            counts[entry.state.value] = counts.get(entry.state.value, 0) + 1
        num_resident, num_evicted = await self.engine.refresh_residency()
        self.metrics.adapter_states(counts, num_resident, evictions=num_evicted)

    async def load_directory(self, adapter_dir: Path, preload: tuple[str, ...] = ()) -> list[str]:
        """Load every adapter subdirectory of ``adapter_dir`` under its directory name.

        ``preload`` names first, then the others, are loaded into the engine's adapter cache until
        ``max_cpu_loras`` are resident; the rest are loaded explicitly before their first request.
        Returns the names that failed (their errors are kept in the registry and logged)."""
        failed = []
        candidates = sorted(adapter_subdirs(adapter_dir), key=lambda p: (p.name not in preload, p.name))
        for i, path in enumerate(candidates):
            try:
                await self.load(path.name, path, warm=i < self.limits.max_cpu_loras)
            except AdapterError as exc:
                logger.error("adapter %s not loaded: %s", path.name, exc)
                failed.append(path.name)
        return failed


__all__ = ["AdapterFailedInEngine", "AdapterLimits", "AdapterLoadFailed", "AdapterManager", "AdapterPathRejected",
           "Lease", "LoadCancelled"]
