"""Adapter-directory watching: the decision logic and a poll over a real directory, fake manager."""

import asyncio
import shutil

from loraplex.server.adapters.watcher import AdapterDirWatcher, plan_changes
from tests.support.adapters import symlink_loop

A1 = (("adapter_config.json", 10, 1), ("adapter_model.safetensors", 100, 1))
A2 = (("adapter_config.json", 10, 1), ("adapter_model.safetensors", 200, 2))


def test_new_adapter_waits_until_stable():
    assert plan_changes({}, {"x": A1}, {}).load == []          # first seen: maybe still being written
    assert plan_changes({"x": A1}, {"x": A1}, {}).load == ["x"]  # unchanged over two polls: load


def test_growing_file_is_not_loaded_until_it_stops_changing():
    assert plan_changes({"x": A1}, {"x": A2}, {}).load == []
    assert plan_changes({"x": A2}, {"x": A2}, {}).load == ["x"]


def test_changed_adapter_is_reloaded_and_removed_one_unloaded():
    changes = plan_changes({"x": A2, "y": A1}, {"x": A2}, {"x": A1, "y": A1})
    assert changes.load == ["x"] and changes.unload == ["y"]
    assert plan_changes({"x": A1}, {"x": A1}, {"x": A1}).load == []  # nothing new


class FakeManager:
    def __init__(self):
        self.calls = []

    async def load(self, name, path):
        self.calls.append(("load", name))

    async def unload(self, name):
        self.calls.append(("unload", name))


def write_adapter(path, weights=b"w"):
    path.mkdir()
    (path / "adapter_config.json").write_text("{}")
    (path / "adapter_model.safetensors").write_bytes(weights)


def test_polls_over_a_directory(tmp_path):
    manager = FakeManager()
    watcher = AdapterDirWatcher(manager, tmp_path, interval_s=0)
    watcher.mark_loaded([])
    write_adapter(tmp_path / "new")
    (tmp_path / "not-an-adapter").mkdir()
    write_adapter(tmp_path / ".hidden-staging")

    async def polls(n):
        for _ in range(n):
            await watcher.poll_once()

    asyncio.run(polls(2))
    assert manager.calls == [("load", "new")]
    (tmp_path / "new" / "adapter_model.safetensors").write_bytes(b"longer weights")
    asyncio.run(polls(2))
    assert manager.calls[-1] == ("load", "new")
    shutil.rmtree(tmp_path / "new")
    asyncio.run(polls(1))
    assert manager.calls[-1] == ("unload", "new") and len(manager.calls) == 3


def test_a_poll_reads_the_directory_off_the_event_loop(tmp_path, monkeypatch):
    """A hung file system (a network mount) stalls the poll, never the loop serving requests."""
    import threading

    from loraplex.server.adapters import watcher as watcher_module

    release = threading.Event()
    real_scan = watcher_module.scan

    def slow_scan(adapter_dir):
        release.wait(5)
        return real_scan(adapter_dir)

    monkeypatch.setattr(watcher_module, "scan", slow_scan)
    watcher = AdapterDirWatcher(FakeManager(), tmp_path, interval_s=0)

    async def main():
        poll = asyncio.ensure_future(watcher.poll_once())
        ticks = 0
        for _ in range(5):  # the loop keeps running while the scan is stuck
            await asyncio.sleep(0.01)
            ticks += 1
        assert not poll.done()
        release.set()
        await poll
        return ticks

    assert asyncio.run(main()) == 5


def test_a_failing_poll_does_not_end_the_watching(tmp_path):
    """--adapter-dir replaced by a symlink loop (pathlib raises RuntimeError, not OSError), then
    put back: the polls in between fail and are logged; the next good one loads what is there."""
    manager = FakeManager()
    watched = tmp_path / "adapters"
    watched.mkdir()
    watcher = AdapterDirWatcher(manager, watched, interval_s=0.01)
    watcher.mark_loaded([])
    aside = tmp_path / "aside"
    watched.rename(aside)
    symlink_loop(watched)

    async def main():
        task = asyncio.ensure_future(watcher.run())
        await asyncio.sleep(0.1)  # polls fail on the loop
        assert not task.done()
        watched.unlink()
        watched.with_name("adapters-twin").unlink()
        aside.rename(watched)
        write_adapter(watched / "new")
        for _ in range(200):
            if manager.calls:
                break
            await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(main())
    assert manager.calls == [("load", "new")]


def test_a_directory_with_a_file_open_for_writing_is_not_loaded(tmp_path):
    """A copy that stalled half-written at full size: stable size and mtime prove nothing, but its
    writer still holds the file open."""
    from loraplex.server.adapters.watcher import open_for_writing

    directory = tmp_path / "x"
    directory.mkdir()
    (directory / "adapter_config.json").write_text("{}")
    writer = (directory / "adapter_model.safetensors").open("wb")
    writer.write(b"\0" * 1024)
    writer.flush()
    try:
        assert open_for_writing(directory)
    finally:
        writer.close()
    assert not open_for_writing(directory)
