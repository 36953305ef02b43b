"""Loads and unloads adapters: validation -> registry -> engine, in that order."""

from __future__ import annotations

import logging
from pathlib import Path

from .registry import AdapterError, AdapterRegistry, AdapterVersion
from .validation import inspect_adapter, is_adapter_dir

logger = logging.getLogger(__name__)


class AdapterLoadFailed(AdapterError):
    status = 400


class AdapterPathRejected(AdapterError):
    status = 400


class AdapterManager:
    def __init__(self, registry: AdapterRegistry, engine, max_lora_rank: int, max_cpu_loras: int,
                 adapter_dir: Path | None = None, allowed_roots: tuple[Path, ...] = ()) -> None:
        self.registry = registry
        self.engine = engine
        self.max_lora_rank = max_lora_rank
        self.max_cpu_loras = max_cpu_loras
        self.adapter_dir = adapter_dir
        self.allowed_roots = tuple(root.resolve() for root in allowed_roots)

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
        entry = self.registry.begin_load(name, path.resolve())
        try:
            info = inspect_adapter(path, self.max_lora_rank)
            entry.rank, entry.target_modules = info.rank, info.target_modules
            if warm:
                await self.engine.add_adapter(entry)
        except AdapterError as exc:
            self.registry.fail_load(entry, str(exc))
            raise
        except Exception as exc:  # the engine's own checks (shapes, modules) reject it
            message = f"the engine rejected adapter {name!r}: {exc}"
            self.registry.fail_load(entry, message)
            raise AdapterLoadFailed(message) from exc
        previous = self.registry.commit_load(entry)
        if previous is not None and previous.num_running_requests == 0 and previous.state.value == "unloading":
            await self.engine.remove_adapter(previous)
        logger.info("adapter %s v%d ready (rank %d, slot %d)", name, entry.version, entry.rank, entry.adapter_slot)
        return entry

    async def unload(self, name: str) -> AdapterVersion:
        entry = self.registry.unregister(name)
        if entry.num_running_requests == 0:
            await self.engine.remove_adapter(entry)
        return entry

    async def load_directory(self, adapter_dir: Path) -> list[str]:
        """Load every adapter subdirectory of ``adapter_dir`` under its directory name.

        The first ``max_cpu_loras`` are loaded into the engine now; the rest load on first use.
        Returns the names that failed (their errors are kept in the registry and logged)."""
        failed = []
        candidates = sorted(p for p in adapter_dir.iterdir() if is_adapter_dir(p))
        for i, path in enumerate(candidates):
            try:
                await self.load(path.name, path, warm=i < self.max_cpu_loras)
            except AdapterError as exc:
                logger.error("adapter %s not loaded: %s", path.name, exc)
                failed.append(path.name)
        return failed
