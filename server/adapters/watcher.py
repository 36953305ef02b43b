"""Keeps the served adapters in step with ``--adapter-dir`` by polling it.

A new subdirectory is loaded, a changed one is loaded again as a new version, a removed one is
unloaded (requests that hold it finish on it).

The publishing convention, which the watcher honours: write an adapter under a hidden name
(``.name.tmp``, ignored) and rename it into place once complete; replace one the same way
(rename the old one away, the new one in). For writers that do not follow it, a directory is
acted on only when its files (names, sizes, mtimes, inodes) are unchanged over two consecutive
polls *and* no process holds one of its files open for writing (a Linux read lease can only be
taken on a file nobody writes; where leases are not permitted, the first rule alone applies).
A copy that stalled half-written at full size is therefore not loaded while its writer is alive.
What is loaded is snapshotted: later changes to the directory reach the engine only as a new version.

The decision (:func:`plan_changes`) is pure bookkeeping, unit-tested without an engine.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from .registry import AdapterError
from .validation import adapter_subdirs

logger = logging.getLogger(__name__)

Fingerprint = tuple[tuple[str, int, int, int], ...]


def fingerprint(path: Path) -> Fingerprint:
    """(name, size, mtime_ns, inode) of every file in an adapter directory."""
    entries = []
    for file in sorted(path.iterdir()):
        try:
            stat = file.stat()
        except OSError:  # removed while we looked
            continue
        if file.is_file():
            entries.append((file.name, stat.st_size, stat.st_mtime_ns, stat.st_ino))
    return tuple(entries)


def open_for_writing(path: Path) -> bool:
    """True when some process holds a file of ``path`` open for writing (Linux read leases:
    F_SETLEASE with F_RDLCK fails with EAGAIN then). False when none does, or when leases are
    not available here (another OS, or files owned by another user without CAP_LEASE)."""
    try:
        import fcntl

        set_lease, read_lock, unlock = fcntl.F_SETLEASE, fcntl.F_RDLCK, fcntl.F_UNLCK
    except (ImportError, AttributeError):
        return False
    for file in path.iterdir():
        try:
            fd = os.open(file, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            fcntl.fcntl(fd, set_lease, read_lock)
            fcntl.fcntl(fd, set_lease, unlock)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EBUSY):
                return True
        finally:
            os.close(fd)
    return False


def scan(adapter_dir: Path) -> dict[str, Fingerprint]:
    return {path.name: fingerprint(path) for path in adapter_subdirs(adapter_dir)}


def being_written(adapter_dir: Path, names: list[str]) -> set[str]:
    return {name for name in names if open_for_writing(adapter_dir / name)}


@dataclass
class Changes:
    load: list[str] = field(default_factory=list)     # new or changed, and stable
    unload: list[str] = field(default_factory=list)   # gone from the directory


def plan_changes(previous_scan: dict[str, Fingerprint], current_scan: dict[str, Fingerprint],
                 served: dict[str, Fingerprint]) -> Changes:
    """What to do after a poll. ``served``: the fingerprint each directory adapter was loaded with."""
    changes = Changes()
    for name, current in sorted(current_scan.items()):
        stable = previous_scan.get(name) == current
        if stable and served.get(name) != current:
            changes.load.append(name)
    changes.unload = sorted(name for name in served if name not in current_scan)
    return changes


class AdapterDirWatcher:
    def __init__(self, manager, adapter_dir: Path, interval_s: float) -> None:
        self.manager = manager
        self.adapter_dir = adapter_dir
        self.interval_s = interval_s
        self._served: dict[str, Fingerprint] = {}
        self._previous: dict[str, Fingerprint] = {}

    def mark_loaded(self, names: list[str]) -> None:
        """Record what the start-up load took from the directory."""
        current = scan(self.adapter_dir)
        self._previous = current
        for name in names:
            if name in current:
                self._served[name] = current[name]

    async def poll_once(self) -> Changes:
        # The directory is read in a worker thread, like every file access while serving: a slow
        # or hung file system (a network mount, hundreds of adapters) must not stall the event loop.
        current = await asyncio.to_thread(scan, self.adapter_dir)
        changes = plan_changes(self._previous, current, self._served)
        self._previous = current
        busy = await asyncio.to_thread(being_written, self.adapter_dir, changes.load)
        changes.load = [name for name in changes.load if name not in busy]  # looked at again next poll
        for name in changes.load:
            self._served[name] = current[name]  # a failure is not retried until the files change again
            try:
                await self.manager.load(name, self.adapter_dir / name)
                logger.info("adapter dir: loaded %s", name)
            except AdapterError as exc:
                logger.error("adapter dir: %s not loaded: %s", name, exc)
        for name in changes.unload:
            del self._served[name]
            try:
                await self.manager.unload(name)
                logger.info("adapter dir: unloaded %s", name)
            except AdapterError as exc:
                logger.warning("adapter dir: %s: %s", name, exc)
        return changes

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.poll_once()
            except OSError as exc:
                logger.error("adapter dir %s cannot be read: %s", self.adapter_dir, exc)
            except Exception:  # (a symlink loop put in its place, say): one poll fails, the watching goes on
                logger.exception("adapter dir %s: this poll failed", self.adapter_dir)
