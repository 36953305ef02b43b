"""Server-owned, read-only, content-addressed snapshots of registered adapter versions.

The engine never reads an operator's directory: a version is copied (never hard-linked: a link
shares the inode, so rewriting the source in place would reach the copy) into
``<root>/<sha256>/``, made read-only, and validated there. Deleting, truncating or rewriting the
source afterwards cannot reach the engine. Versions with the same content share one snapshot,
counted; the snapshot is removed when its last version is gone.

Pure file handling (no torch, no engine), so it is unit-tested anywhere.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from .registry import AdapterError
from .validation import resolve_inside

# The files of a PEFT LoRA adapter that the engine reads; nothing else is copied.
SNAPSHOT_FILES = ("adapter_config.json", "adapter_model.safetensors")
COPY_CHUNK_BYTES = 1 << 20


class SnapshotFailed(AdapterError):
    status = 400


@dataclass(frozen=True)
class Snapshot:
    digest: str  # sha256 over the files' names and contents
    path: Path


class SnapshotStore:
    """Thread-safe: snapshots are taken in worker threads, released from the event loop."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._refs: dict[str, int] = {}

    def take(self, source: Path) -> Snapshot:
        """Copy ``source``'s adapter files into the store (or count another user of an identical
        snapshot). Files must be regular files inside ``source`` (a symlink only when it stays inside; no FIFOs or devices)."""
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.root))
        try:
            digest = hashlib.sha256()
            budget = self.max_bytes
            for name in SNAPSHOT_FILES:
                budget -= _copy_regular_file(resolve_inside(source, name), staging / name, budget, digest)
            key = digest.hexdigest()
            for name in SNAPSHOT_FILES:
                (staging / name).chmod(stat.S_IRUSR | stat.S_IRGRP)
            with self._lock:
                final = self.root / key
                if key in self._refs:
                    self._refs[key] += 1
                else:
                    if final.exists():  # left over by an earlier server on the same store
                        _remove_tree(final)
                    staging.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)
                    staging.rename(final)
                    self._refs[key] = 1
            return Snapshot(key, final)
        finally:
            if staging.exists():
                _remove_tree(staging)

    def release(self, snapshot: Snapshot) -> None:
        """One user fewer; the last one removes the snapshot."""
        with self._lock:
            count = self._refs.get(snapshot.digest, 0) - 1
            if count > 0:
                self._refs[snapshot.digest] = count
                return
            self._refs.pop(snapshot.digest, None)
        _remove_tree(snapshot.path)

    def remove_all(self) -> None:
        """At exit: every snapshot, then the store itself."""
        with self._lock:
            self._refs.clear()
        if self.root.exists():
            for path in self.root.iterdir():
                _remove_tree(path)
            shutil.rmtree(self.root, ignore_errors=True)

    def num_snapshots(self) -> int:
        with self._lock:
            return len(self._refs)


def snapshot_fingerprint(path: Path) -> tuple | None:
    """What ``stat`` says of a snapshot's files (inode, size, change time): equal fingerprints
    mean the files were not rewritten, replaced or truncated in between (the change time cannot be
    set back). None when a file is gone."""
    try:
        return tuple((info.st_ino, info.st_size, info.st_ctime_ns)
                     for info in (os.stat(path / name) for name in SNAPSHOT_FILES))
    except OSError:
        return None


def _copy_regular_file(source: Path, destination: Path, budget: int, digest) -> int:
    """Copy one file, refusing anything but a regular file (a FIFO would block the copy forever)
    and anything over ``budget`` bytes; the digest covers the name and the bytes copied."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(source, flags)
    except FileNotFoundError as exc:
        raise SnapshotFailed(f"{source.name} is missing in {source.parent.name!r}") from exc
    except OSError as exc:
        raise SnapshotFailed(f"{source.name} cannot be read (a symlink?): {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as src:
        if not stat.S_ISREG(os.fstat(src.fileno()).st_mode):
            raise SnapshotFailed(f"{source.name} is not a regular file")
        digest.update(destination.name.encode() + b"\0")
        copied = 0
        with destination.open("xb") as dst:
            while chunk := src.read(COPY_CHUNK_BYTES):
                copied += len(chunk)
                if copied > budget:
                    raise SnapshotFailed(f"the adapter's files exceed the limit of {budget} bytes")
                digest.update(chunk)
                dst.write(chunk)
        digest.update(b"\0")
    return copied


def _remove_tree(path: Path) -> None:
    """Remove a (read-only) snapshot directory: files are unlinked once the directory is writable."""
    if path.exists():
        os.chmod(path, stat.S_IRWXU)
        shutil.rmtree(path, ignore_errors=True)
