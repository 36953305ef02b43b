"""Adapter registry bookkeeping (no torch, no engine)."""

from pathlib import Path

import pytest

from loraplex.server.adapters.registry import (
    AdapterNotReady,
    AdapterRegistry,
    AdapterState,
    InvalidAdapterName,
    LoadCancelled,
    UnknownAdapter,
)

BASE = "base-model"


def ready(registry: AdapterRegistry, name: str, path: str = "/a"):
    entry = registry.begin_load(name, Path(path))
    registry.commit_load(entry)
    return entry


def test_versions_get_fresh_slots_and_new_requests_see_the_new_version():
    registry = AdapterRegistry(BASE)
    v1 = ready(registry, "billing")
    assert registry.acquire("billing") is v1  # a request running on v1
    v2 = registry.begin_load("billing", Path("/b"))
    assert registry.commit_load(v2) is v1
    assert (v1.version, v2.version) == (1, 2)
    assert v1.adapter_slot != v2.adapter_slot
    assert registry.resolve("billing") is v2
    assert v1.state is AdapterState.UNLOADING
    assert registry.release(v1) is True  # last lease on v1 ended: now it can be removed
    assert registry.acquire("billing") is v2 and registry.release(v2) is False  # v2 is still served


def test_loading_version_does_not_replace_ready_one_until_committed():
    registry = AdapterRegistry(BASE)
    v1 = ready(registry, "triage")
    pending = registry.begin_load("triage", Path("/new"))
    assert registry.resolve("triage") is v1
    registry.fail_load(pending, "corrupt")
    assert registry.resolve("triage") is v1  # a failed reload keeps the ready version serving


def test_failed_adapter_reports_its_error_only_to_admins():
    registry = AdapterRegistry(BASE)
    entry = registry.begin_load("broken", Path("/secret/x"))
    registry.fail_load(entry, "rank 512 exceeds 16 in /secret/x")
    with pytest.raises(AdapterNotReady, match="failed to load"):
        registry.resolve("broken")
    assert registry.get("broken").state is AdapterState.FAILED
    assert "/secret" not in str(entry.describe(admin=False))
    assert entry.describe(admin=True)["error"] == "rank 512 exceeds 16 in /secret/x"
    assert entry.describe(admin=True)["path"] == "/secret/x"


def test_unknown_and_unregistered():
    registry = AdapterRegistry(BASE)
    with pytest.raises(UnknownAdapter):
        registry.resolve("nope")
    entry = ready(registry, "x")
    assert registry.unregister("x") == (entry, [])
    with pytest.raises(UnknownAdapter):
        registry.resolve("x")
    with pytest.raises(UnknownAdapter):
        registry.unregister("x")


def test_an_unload_racing_a_pending_load_wins():
    registry = AdapterRegistry(BASE)
    v1 = ready(registry, "x")
    pending = registry.begin_load("x", Path("/b"))
    current, cancelled = registry.unregister("x")
    assert current is v1 and cancelled == [pending] and pending.state is AdapterState.CANCELLED
    with pytest.raises(LoadCancelled):
        registry.commit_load(pending)
    with pytest.raises(UnknownAdapter):
        registry.resolve("x")
    # an unload of a name whose only version is still loading is accepted, and wins too
    first = registry.begin_load("y", Path("/y"))
    assert registry.unregister("y") == (None, [first])
    with pytest.raises(LoadCancelled):
        registry.commit_load(first)


def test_an_older_load_finishing_last_does_not_replace_a_newer_one():
    registry = AdapterRegistry(BASE)
    older = registry.begin_load("x", Path("/old"))
    newer = registry.begin_load("x", Path("/new"))
    registry.commit_load(newer)
    assert registry.commit_load(older) is older and older.state is AdapterState.UNLOADING
    assert registry.resolve("x") is newer


def test_a_version_failed_in_the_engine_gets_no_new_lease():
    registry = AdapterRegistry(BASE)
    entry = ready(registry, "x")
    registry.acquire("x")
    registry.mark_failed(entry, "refused")
    with pytest.raises(AdapterNotReady):
        registry.acquire("x")
    assert registry.release(entry) is True  # its last lease ended: remove it


@pytest.mark.parametrize("name", ["", "../etc", "a/b", "a\\b", ".hidden", "x" * 200, "a..b", BASE, "name\n",
                                  "name\r", "name\x00", "na me", "\u00e9"])
def test_bad_names_are_rejected(name):
    with pytest.raises(InvalidAdapterName):
        AdapterRegistry(BASE).begin_load(name, Path("/a"))
