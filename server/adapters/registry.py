"""Adapter registry: name -> versions -> engine slot id, and who holds each version.

Pure bookkeeping (no torch, no engine), so it is unit-tested anywhere. The engine slot id is
vLLM's ``lora_int_id``: every version of every adapter gets a fresh one, so a replaced adapter
never reuses state cached under the old version's id.

Lifecycle of a version: LOADING (registered, being validated) -> READY (new requests get it) ->
UNLOADING (replaced or unloaded; requests that leased it finish on it) -> gone (its last lease
ended: the manager removes it from the engine and drops its snapshot). A load that fails is
FAILED; a load that an unload overtook is CANCELLED and never becomes READY.
"""

from __future__ import annotations

import enum
import itertools
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

ADAPTER_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class AdapterState(str, enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    UNLOADING = "unloading"
    CANCELLED = "cancelled"


class AdapterError(Exception):
    """Base for adapter errors; ``status`` is the HTTP status a front door maps it to, ``reason``
    the label its failure metric gets."""

    status = 400
    reason = "invalid_adapter"


class UnknownAdapter(AdapterError):
    status = 404
    reason = "unknown_adapter"


class AdapterNotReady(AdapterError):
    status = 503
    reason = "not_ready"


class InvalidAdapterName(AdapterError):
    status = 400
    reason = "invalid_name"


class LoadCancelled(AdapterError):
    """An unload of the same name arrived while this load was still running: the unload wins."""

    status = 409
    reason = "cancelled"


def check_adapter_name(name: str) -> str:
    if not isinstance(name, str) or not ADAPTER_NAME_PATTERN.fullmatch(name) or ".." in name:
        raise InvalidAdapterName(
            f"invalid adapter name {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, without '..'"
        )
    return name


@dataclass(eq=False)
class AdapterVersion:
    name: str
    version: int
    adapter_slot: int  # the engine's lora_int_id, unique over all versions of all adapters
    source_path: Path  # the operator's directory it was loaded from (never read by the engine)
    state: AdapterState = AdapterState.LOADING
    error: str | None = None
    rank: int | None = None
    target_modules: tuple[str, ...] = ()
    registered_at: float = field(default_factory=time.time)
    num_leases: int = 0  # requests that resolved this version and have not finished
    pinned: bool = False
    digest: str | None = None  # sha256 of the snapshot's contents (part of the version's identity)
    snapshot_path: Path | None = None  # the server-owned, read-only copy the engine reads
    snapshot: object | None = None  # the store's handle, released when the version is gone

    def describe(self, *, admin: bool) -> dict:
        """What the adapter listings report; paths and raw error texts only to admins."""
        view = {"name": self.name, "version": self.version, "status": self.state.value, "rank": self.rank,
                "target_modules": list(self.target_modules), "sha256": self.digest,
                "loaded_at_unix": self.registered_at, "running_requests": self.num_leases, "pinned": self.pinned}
        if admin:
            view.update(error=self.error, path=str(self.source_path),
                        snapshot_path=None if self.snapshot_path is None else str(self.snapshot_path))
        else:
            view["error"] = None if self.error is None else "the adapter failed to load"
        return view


class AdapterRegistry:
    """Tracks which version of each adapter new requests get, and which versions are in use."""

    def __init__(self, base_model_name: str) -> None:
        self.base_model_name = base_model_name
        self._current: dict[str, AdapterVersion] = {}
        self._loading: dict[str, list[AdapterVersion]] = {}
        self._next_slot = itertools.count(1)
        self._next_version: dict[str, int] = {}

    # -- registration -------------------------------------------------------------------------
    def begin_load(self, name: str, source_path: Path) -> AdapterVersion:
        """Register a new version in state LOADING; the current version (if any) keeps serving."""
        check_adapter_name(name)
        if name == self.base_model_name:
            raise InvalidAdapterName(f"adapter name {name!r} is the base model's name")
        version = self._next_version.get(name, 0) + 1
        self._next_version[name] = version
        entry = AdapterVersion(name=name, version=version, adapter_slot=next(self._next_slot),
                               source_path=source_path)
        self._loading.setdefault(name, []).append(entry)
        return entry

    def register_in_place(self, name: str, path: Path) -> AdapterVersion:
        """A ready version read where it lies (no snapshot): for tools that own their adapter
        files for the whole run (benchmarks, the training evaluation), never for the server."""
        entry = self.begin_load(name, path)
        entry.snapshot_path = path
        self.commit_load(entry)
        return entry

    def commit_load(self, entry: AdapterVersion) -> AdapterVersion | None:
        """Make ``entry`` the version new requests get; returns the version it replaced (now
        UNLOADING). Raises :class:`LoadCancelled` if an unload overtook the load, and leaves a
        newer version that committed first in place (``entry`` is then retired itself)."""
        self._end_loading(entry)
        if entry.state is AdapterState.CANCELLED:
            raise LoadCancelled(f"adapter {entry.name!r} was unloaded while version {entry.version} was loading")
        entry.state = AdapterState.READY
        entry.error = None
        previous = self._current.get(entry.name)
        if previous is not None and previous.state is AdapterState.READY and previous.version > entry.version:
            entry.state = AdapterState.UNLOADING  # a newer load finished first: it keeps serving
            return entry
        self._current[entry.name] = entry
        if previous is not None and previous.state is AdapterState.READY:
            previous.state = AdapterState.UNLOADING
            return previous
        return None

    def fail_load(self, entry: AdapterVersion, error: str) -> None:
        """Record a failed load; an adapter with a ready version keeps serving that one."""
        self._end_loading(entry)
        if entry.state is AdapterState.CANCELLED:
            return
        entry.state = AdapterState.FAILED
        entry.error = error
        current = self._current.get(entry.name)
        if current is None or current.state is not AdapterState.READY:
            self._current[entry.name] = entry

    def mark_failed(self, entry: AdapterVersion, error: str) -> None:
        """A ready version that failed later (inside the engine): no new request gets it."""
        if entry.state is AdapterState.READY:
            entry.state = AdapterState.FAILED
            entry.error = error

    def unregister(self, name: str) -> tuple[AdapterVersion | None, list[AdapterVersion]]:
        """Stop serving ``name``: returns (the version that was current, now UNLOADING or as it
        was if FAILED; the loads in flight, now CANCELLED). Raises UnknownAdapter if neither."""
        check_adapter_name(name)
        entry = self._current.pop(name, None)
        cancelled = self._loading.get(name, [])
        for pending in cancelled:
            pending.state = AdapterState.CANCELLED
            pending.error = "unloaded while loading"
        if entry is None and not cancelled:
            raise UnknownAdapter(f"adapter {name!r} is not loaded")
        if entry is not None and entry.state is AdapterState.READY:
            entry.state = AdapterState.UNLOADING
        return entry, list(cancelled)

    def _end_loading(self, entry: AdapterVersion) -> None:
        pending = self._loading.get(entry.name, [])
        if entry in pending:
            pending.remove(entry)
        if not pending:
            self._loading.pop(entry.name, None)

    # -- lookup ---------------------------------------------------------------------------------
    def get(self, name: str) -> AdapterVersion:
        entry = self._current.get(name)
        if entry is None:
            raise UnknownAdapter(f"The model `{name}` does not exist.")
        return entry

    def resolve(self, name: str) -> AdapterVersion:
        """The ready version a new request for ``name`` runs on (no lease: see :meth:`acquire`)."""
        entry = self.get(name)
        if entry.state is AdapterState.FAILED:
            raise AdapterNotReady(f"adapter {name!r} failed to load")
        if entry.state is not AdapterState.READY:
            raise AdapterNotReady(f"adapter {name!r} is {entry.state.value}")
        return entry

    def adapters(self) -> list[AdapterVersion]:
        return sorted(self._current.values(), key=lambda e: e.name)

    # -- leases ---------------------------------------------------------------------------------
    def acquire(self, name: str) -> AdapterVersion:
        """Resolve ``name`` and lease that version in one step (nothing can unload it between)."""
        entry = self.resolve(name)
        entry.num_leases += 1
        return entry

    def release(self, entry: AdapterVersion) -> bool:
        """End one lease; True when ``entry`` is no longer served and nobody holds it: the caller
        removes it now (and only then)."""
        entry.num_leases -= 1
        return self.is_idle_and_retired(entry)

    @staticmethod
    def is_idle_and_retired(entry: AdapterVersion) -> bool:
        return entry.num_leases == 0 and entry.state in (AdapterState.UNLOADING, AdapterState.FAILED)
