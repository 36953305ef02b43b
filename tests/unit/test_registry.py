"""Adapter registry bookkeeping (no torch, no engine)."""

from pathlib import Path

import pytest

from server.adapters.registry import (
    AdapterNotReady,
    AdapterRegistry,
    AdapterState,
    InvalidAdapterName,
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
    registry.acquire(v1)  # a request running on v1
    v2 = ready(registry, "billing", "/b")
    assert (v1.version, v2.version) == (1, 2)
    assert v1.adapter_slot != v2.adapter_slot
    assert registry.resolve("billing") is v2
    assert v1.state is AdapterState.UNLOADING
    assert registry.retiring() == [v1]
    assert registry.release(v1) is True  # last request on v1 ended: now it can be removed
    assert registry.retiring() == []


def test_loading_version_does_not_replace_ready_one_until_committed():
    registry = AdapterRegistry(BASE)
    v1 = ready(registry, "triage")
    pending = registry.begin_load("triage", Path("/new"))
    assert registry.resolve("triage") is v1
    registry.fail_load(pending, "corrupt")
    assert registry.resolve("triage") is v1  # a failed reload keeps the ready version serving


def test_failed_adapter_reports_its_error():
    registry = AdapterRegistry(BASE)
    entry = registry.begin_load("broken", Path("/x"))
    registry.fail_load(entry, "rank 512 exceeds 16")
    with pytest.raises(AdapterNotReady, match="rank 512"):
        registry.resolve("broken")
    assert registry.get("broken").state is AdapterState.FAILED


def test_unknown_and_unregistered():
    registry = AdapterRegistry(BASE)
    with pytest.raises(UnknownAdapter):
        registry.resolve("nope")
    entry = ready(registry, "x")
    assert registry.unregister("x") is entry
    with pytest.raises(UnknownAdapter):
        registry.resolve("x")
    with pytest.raises(UnknownAdapter):
        registry.unregister("x")


@pytest.mark.parametrize("name", ["", "../etc", "a/b", "a\\b", ".hidden", "x" * 200, "a..b", BASE])
def test_bad_names_are_rejected(name):
    with pytest.raises(InvalidAdapterName):
        AdapterRegistry(BASE).begin_load(name, Path("/a"))
