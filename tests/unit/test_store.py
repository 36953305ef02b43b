"""The adapter snapshot store: copies, not links; read-only; shared by content; refused inputs."""

import os
import stat
from pathlib import Path

import pytest

from loraplex.server.adapters.store import SnapshotFailed, SnapshotStore


def adapter(directory: Path, weights: bytes = b"weights") -> Path:
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text('{"r": 8}')
    (directory / "adapter_model.safetensors").write_bytes(weights)
    return directory


def test_snapshot_is_an_independent_read_only_copy(tmp_path):
    store = SnapshotStore(tmp_path / "store", max_bytes=1 << 20)
    source = adapter(tmp_path / "src")
    snapshot = store.take(source)
    weights = snapshot.path / "adapter_model.safetensors"
    assert snapshot.path.parent == tmp_path / "store" and snapshot.path.name == snapshot.digest
    assert os.stat(weights).st_ino != os.stat(source / "adapter_model.safetensors").st_ino
    assert not os.stat(weights).st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    # the operator rewrites, truncates, then deletes the source: the snapshot is untouched
    (source / "adapter_model.safetensors").write_bytes(b"rewritten")
    os.truncate(source / "adapter_model.safetensors", 2)
    for file in source.iterdir():
        file.unlink()
    assert weights.read_bytes() == b"weights"


def test_same_content_shares_one_snapshot_until_its_last_user_goes(tmp_path):
    store = SnapshotStore(tmp_path / "store", max_bytes=1 << 20)
    first = store.take(adapter(tmp_path / "a"))
    second = store.take(adapter(tmp_path / "b"))
    other = store.take(adapter(tmp_path / "c", b"other weights"))
    assert first == second and first.digest != other.digest and store.num_snapshots() == 2
    store.release(first)
    assert second.path.is_dir()
    store.release(second)
    assert not second.path.exists() and other.path.is_dir() and store.num_snapshots() == 1
    assert [p.name for p in (tmp_path / "store").iterdir()] == [other.digest]  # no staging left over


def test_refused_inputs_leave_nothing_behind(tmp_path):
    store = SnapshotStore(tmp_path / "store", max_bytes=100)
    with pytest.raises(SnapshotFailed, match="exceed the limit"):
        store.take(adapter(tmp_path / "big", b"x" * 200))
    fifo = adapter(tmp_path / "fifo")
    (fifo / "adapter_model.safetensors").unlink()
    os.mkfifo(fifo / "adapter_model.safetensors")  # a read would block forever
    with pytest.raises(SnapshotFailed, match="not a regular file"):
        store.take(fifo)
    missing = adapter(tmp_path / "missing")
    (missing / "adapter_config.json").unlink()
    with pytest.raises(SnapshotFailed, match="missing"):
        store.take(missing)
    assert list((tmp_path / "store").iterdir()) == []



def test_symlinks_are_followed_only_inside_the_source(tmp_path):
    from loraplex.server.adapters.validation import InvalidAdapter

    store = SnapshotStore(tmp_path / "store", max_bytes=1 << 20)
    inside = adapter(tmp_path / "inside")
    (inside / "weights.bin").write_bytes(b"real weights")
    (inside / "adapter_model.safetensors").unlink()
    (inside / "adapter_model.safetensors").symlink_to("weights.bin")  # stays inside: followed
    assert (store.take(inside).path / "adapter_model.safetensors").read_bytes() == b"real weights"
    secret = tmp_path / "secret.txt"
    secret.write_text("another tenant's file")
    leaking = adapter(tmp_path / "leaking")
    (leaking / "adapter_model.safetensors").unlink()
    (leaking / "adapter_model.safetensors").symlink_to(secret)
    with pytest.raises(InvalidAdapter, match="symlink that leaves"):
        store.take(leaking)
