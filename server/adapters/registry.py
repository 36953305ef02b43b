"""Adapter registry: name -> versions -> engine slot id.

Pure bookkeeping (no torch, no engine), so it is unit-tested anywhere. The engine slot id is
vLLM's ``lora_int_id``: every version of every adapter gets a fresh one, so a replaced adapter
never reuses state cached under the old version's id.
"""

from __future__ import annotations

import enum
import itertools
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

ADAPTER_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class AdapterState(str, enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    UNLOADING = "unloading"


class AdapterError(Exception):
    """Base for registry errors; ``status`` is the HTTP status a front door maps it to."""

    status = 400


class UnknownAdapter(AdapterError):
    status = 404


class AdapterNotReady(AdapterError):
    status = 503


class InvalidAdapterName(AdapterError):
    status = 400


def check_adapter_name(name: str) -> str:
    if not isinstance(name, str) or not ADAPTER_NAME_PATTERN.match(name) or ".." in name:
        raise InvalidAdapterName(
            f"invalid adapter name {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, without '..'"
        )
    return name


@dataclass
class AdapterVersion:
    name: str
    version: int
    adapter_slot: int  # the engine's lora_int_id, unique over all versions of all adapters
    path: Path
    state: AdapterState = AdapterState.LOADING
    error: str | None = None
    rank: int | None = None
    target_modules: tuple[str, ...] = ()
    registered_at: float = field(default_factory=time.time)
    num_running_requests: int = 0
    pinned: bool = False

    def describe(self) -> dict:
        """What admin APIs (HTTP and gRPC) report about this version."""
        return {"name": self.name, "version": self.version, "status": self.state.value, "error": self.error,
                "rank": self.rank, "target_modules": list(self.target_modules), "path": str(self.path),
                "loaded_at_unix": self.registered_at, "running_requests": self.num_running_requests,
                "pinned": self.pinned}


class AdapterRegistry:
    """Tracks which version of each adapter new requests get, and which versions are in use."""

    def __init__(self, base_model_name: str) -> None:
        self.base_model_name = base_model_name
        self._current: dict[str, AdapterVersion] = {}
        # Versions replaced or unloaded while requests still ran on them, by adapter slot.
        self._retiring: dict[int, AdapterVersion] = {}
        self._next_slot = itertools.count(1)
        self._next_version: dict[str, int] = {}

    # -- registration -------------------------------------------------------------------------
    def begin_load(self, name: str, path: Path, rank: int | None = None,
                   target_modules: tuple[str, ...] = ()) -> AdapterVersion:
        """Register a new version in state LOADING; the current version (if any) keeps serving."""
        check_adapter_name(name)
        if name == self.base_model_name:
            raise InvalidAdapterName(f"adapter name {name!r} is the base model's name")
        version = self._next_version.get(name, 0) + 1
        self._next_version[name] = version
        return AdapterVersion(name=name, version=version, adapter_slot=next(self._next_slot),
                              path=path, rank=rank, target_modules=target_modules)

    def commit_load(self, entry: AdapterVersion) -> AdapterVersion | None:
        """Make ``entry`` the version new requests get; returns the version it replaced."""
        entry.state = AdapterState.READY
        entry.error = None
        previous = self._current.get(entry.name)
        self._current[entry.name] = entry
        if previous is not None and previous.state is AdapterState.READY:
            self._retire(previous)
        return previous

    def fail_load(self, entry: AdapterVersion, error: str) -> None:
        """Record a failed load; an adapter with a ready version keeps serving that one."""
        entry.state = AdapterState.FAILED
        entry.error = error
        current = self._current.get(entry.name)
        if current is None or current.state is not AdapterState.READY:
            self._current[entry.name] = entry

    def unregister(self, name: str) -> AdapterVersion:
        entry = self._current.pop(name, None)
        if entry is None:
            raise UnknownAdapter(f"adapter {name!r} is not loaded")
        if entry.state is AdapterState.READY:
            self._retire(entry)
        return entry

    def _retire(self, entry: AdapterVersion) -> None:
        entry.state = AdapterState.UNLOADING
        if entry.num_running_requests > 0:
            self._retiring[entry.adapter_slot] = entry

    # -- lookup ---------------------------------------------------------------------------------
    def get(self, name: str) -> AdapterVersion:
        entry = self._current.get(name)
        if entry is None:
            raise UnknownAdapter(f"The model `{name}` does not exist.")
        return entry

    def resolve(self, name: str) -> AdapterVersion:
        """The ready version a new request for ``name`` runs on."""
        entry = self.get(name)
        if entry.state is AdapterState.FAILED:
            raise AdapterNotReady(f"adapter {name!r} failed to load: {entry.error}")
        if entry.state is not AdapterState.READY:
            raise AdapterNotReady(f"adapter {name!r} is {entry.state.value}")
        return entry

    def adapters(self) -> list[AdapterVersion]:
        return sorted(self._current.values(), key=lambda e: e.name)

    def __contains__(self, name: str) -> bool:
        return name in self._current

    # -- request accounting ---------------------------------------------------------------------
    def acquire(self, entry: AdapterVersion) -> None:
        entry.num_running_requests += 1

    def release(self, entry: AdapterVersion) -> bool:
        """Count a finished request; True when a retired version has just become unused."""
        entry.num_running_requests -= 1
        if entry.num_running_requests == 0 and entry.adapter_slot in self._retiring:
            del self._retiring[entry.adapter_slot]
            return True
        return False

    def retiring(self) -> list[AdapterVersion]:
        return list(self._retiring.values())
