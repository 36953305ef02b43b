"""Every tenant fails alone, adapters side (the session server): a bad adapter or a file changed
under the server gets a clear error of its own, /health stays 200, and a good adapter's greedy
output is unchanged."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.support.adapters import make_adapter

from .conftest import ADMIN_TOKEN
from .test_adapter_admin import ADMIN, load, unload

pytestmark = pytest.mark.integration

PROMPT = "The three primary colours are"


def greedy(client, model: str) -> str:
    return client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text


def assert_healthy(server) -> None:
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def admin_view(server, name: str) -> dict | None:
    listing = httpx.get(f"{server.url}/v1/adapters", headers=ADMIN).json()["data"]
    return {a["name"]: a for a in listing}.get(name)


def copy_adapter(good: Path, dst: Path, config_changes: dict | None = None, tensors=None) -> Path:
    """A copy of ``good``, optionally with config changes and tensors rewritten by ``tensors(dict)``."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True)
    config = json.loads((good / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**config, **(config_changes or {})}))
    weights = load_file(str(good / "adapter_model.safetensors"))
    if tensors is not None:
        tensors(weights)
    save_file(weights, str(dst / "adapter_model.safetensors"))
    return dst


def poison_one_b(weights: dict, value: float) -> None:
    key = next(k for k in sorted(weights) if ".lora_B." in k)
    weights[key][0, 0] = value


@pytest.fixture(scope="module")
def reference(client, adapter_names) -> tuple[str, str]:
    """A good adapter and its greedy output before anything bad happened."""
    name = adapter_names[6]
    return name, greedy(client, name)


BAD = {  # name -> (config changes, tensor change, expected message)
    "nan-b": ({}, lambda w: poison_one_b(w, float("nan")), "NaN or Inf"),
    "inf-b": ({}, lambda w: poison_one_b(w, float("inf")), "NaN or Inf"),
    "nan-alpha": ({"lora_alpha": float("nan")}, None, "lora_alpha"),
    "huge-alpha": ({"lora_alpha": 1e30}, None, "scale"),
    "overflow-once-folded": ({"lora_alpha": 8000.0}, lambda w: poison_one_b(w, 1e36), "overflows"),  # scale 1000
    "pissa": ({"init_lora_weights": "pissa"}, None, "init_lora_weights"),  # only vLLM's own loader refuses it
}


@pytest.mark.parametrize("name", list(BAD))
def test_a_bad_adapter_is_refused_with_its_own_error(server, client, adapter_dir, adapter_names, tmp_path, name,
                                                      reference):
    config, tensors, message = BAD[name]
    path = copy_adapter(adapter_dir / adapter_names[1], tmp_path / name, config, tensors)
    response = load(server, name, path)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]
    assert_healthy(server)
    good, expected = reference
    assert greedy(client, good) == expected


def test_name_with_a_trailing_newline_is_refused(server, adapter_dir, adapter_names):
    response = load(server, "sneaky\n", adapter_dir / adapter_names[1])
    assert response.status_code == 400 and "invalid adapter name" in response.json()["error"]["message"]


def test_the_engine_reads_a_snapshot_never_the_operators_directory(server, client, adapter_dir, adapter_names,
                                                                    hf_base_model, tmp_path, reference):
    """Delete, truncate and rewrite the source after loading, and push the adapter out of the
    engine's CPU cache so the engine must read it again: its output does not change."""
    source = copy_adapter(adapter_dir / adapter_names[2], tmp_path / "fragile")
    assert load(server, "fragile", source).status_code == 200
    before = greedy(client, "fragile")
    view = admin_view(server, "fragile")
    snapshot = Path(view["snapshot_path"])
    assert len(view["sha256"]) == 64 and snapshot.name == view["sha256"]
    assert not snapshot.is_relative_to(source)
    assert not (os.stat(snapshot / "adapter_model.safetensors").st_mode & 0o222), "snapshots are read-only"

    other = make_adapter(hf_base_model, tmp_path / "other", seed=4242)
    shutil.copy(other / "adapter_model.safetensors", source / "adapter_model.safetensors")  # rewritten
    os.truncate(source / "adapter_model.safetensors", 100)  # truncated
    shutil.rmtree(source)  # deleted
    # Push it out of the engine's CPU cache (--max-cpu-loras 16): the engine must read it again.
    fillers = [f"evict-{i}" for i in range(17)]
    try:
        for name in fillers:
            assert load(server, name, adapter_dir / adapter_names[3]).status_code == 200
        assert greedy(client, "fragile") == before
    finally:
        for name in fillers:
            unload(server, name)
    assert_healthy(server)
    good, expected = reference
    assert greedy(client, good) == expected
    assert unload(server, "fragile").status_code == 200
    deadline = time.monotonic() + 10
    while snapshot.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not snapshot.exists(), "the snapshot outlived its last version"


def test_inference_keys_see_names_not_paths(server, adapter_names):
    listing = httpx.get(f"{server.url}/v1/adapters").json()["data"]
    entry = {a["name"]: a for a in listing}[adapter_names[0]]
    assert "path" not in entry and "snapshot_path" not in entry and len(entry["sha256"]) == 64
    models = httpx.get(f"{server.url}/v1/models").json()["data"]
    assert all("/" not in m["root"] for m in models)


def test_capture_keeps_tenants_apart(server, client, adapter_dir, adapter_names, capture_dir):
    names = ["cap", "cap.", "cap_"]
    for i, name in enumerate(names):
        assert load(server, name, adapter_dir / adapter_names[1 + i]).status_code == 200
    (capture_dir / "victim.jsonl").symlink_to(capture_dir.parent / "planted-target.jsonl")
    assert load(server, "victim", adapter_dir / adapter_names[4]).status_code == 200
    try:
        for name in [*names, "victim"]:
            client.chat.completions.create(model=name, messages=[{"role": "user", "content": f"hi {name}"}],
                                           max_tokens=2)
        from loraplex.server.capture import capture_file_name
        from loraplex.server.training import data

        assert len([p for p in capture_dir.iterdir() if p.name.startswith("cap")]) == 3
        for name in names:
            records = data.read_records(capture_dir / capture_file_name(name))
            assert [r["messages"][0]["content"] for r in records] == [f"hi {name}"]
        assert not (capture_dir.parent / "planted-target.jsonl").exists()
    finally:
        for name in [*names, "victim"]:
            unload(server, name)


def test_a_watched_copy_still_being_written_is_not_served(server, adapter_dir, adapter_names):
    """Full size, stable size and mtime, but its writer still holds it open: not loaded until closed."""
    target = adapter_dir / "half-written"
    target.mkdir()
    (target / "adapter_config.json").write_text((adapter_dir / adapter_names[1] / "adapter_config.json").read_text())
    data = (adapter_dir / adapter_names[1] / "adapter_model.safetensors").read_bytes()
    writer = (target / "adapter_model.safetensors").open("wb")
    writer.truncate(len(data))  # full size at once, then the writer stalls
    writer.write(data[: len(data) // 2])
    writer.flush()
    try:
        time.sleep(2.5)  # five polls of --watch-interval 0.5
        assert admin_view(server, "half-written") is None
        writer.write(data[len(data) // 2:])
    finally:
        writer.close()
    deadline = time.monotonic() + 15
    while (admin_view(server, "half-written") or {}).get("status") != "ready" and time.monotonic() < deadline:
        time.sleep(0.25)
    assert admin_view(server, "half-written")["status"] == "ready"
    shutil.rmtree(target)


def test_a_huge_safetensors_header_does_not_stall_the_server(server, adapter_dir, adapter_names, tmp_path):
    """Header parsing and validation run in a worker thread: /health answers meanwhile."""
    from safetensors.torch import load_file, save_file

    path = tmp_path / "huge-header"
    path.mkdir()
    shutil.copy(adapter_dir / adapter_names[1] / "adapter_config.json", path)
    weights = load_file(str(adapter_dir / adapter_names[1] / "adapter_model.safetensors"))
    save_file(weights, str(path / "adapter_model.safetensors"), metadata={f"k{i}": "x" * 1000 for i in range(30_000)})
    result = {}
    loader = threading.Thread(target=lambda: result.update(response=load(server, "huge-header", path)))
    loader.start()
    slowest = 0.0
    while loader.is_alive():
        started = time.monotonic()
        assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200
        slowest = max(slowest, time.monotonic() - started)
        time.sleep(0.05)
    loader.join()
    assert result["response"].status_code == 200, result["response"].text
    assert slowest < 2.0, f"/health took {slowest:.1f} s while a large adapter was validated"
    unload(server, "huge-header")


def test_unload_during_streams_lets_them_finish_on_their_version(server, client, adapter_dir, adapter_names,
                                                                  tmp_path):
    source = copy_adapter(adapter_dir / adapter_names[5], tmp_path / "leaving")
    assert load(server, "leaving", source).status_code == 200
    expected = greedy(client, "leaving")
    stream = client.completions.create(model="leaving", prompt=PROMPT, max_tokens=8, temperature=0, stream=True)
    first = next(stream)  # running on its version now
    shutil.rmtree(source)
    assert unload(server, "leaving").status_code == 200
    text = first.choices[0].text + "".join(c.choices[0].text for c in stream if c.choices)
    assert text == expected
    with pytest.raises(Exception):
        greedy(client, "leaving")
    assert_healthy(server)


def test_admin_token_is_needed_for_paths_over_grpc_too(server):
    import grpc

    from loraplex.server.grpc_gen import loraplex_pb2 as pb
    from loraplex.server.grpc_gen import loraplex_pb2_grpc as pb_grpc

    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = pb_grpc.AdaptersStub(channel)
        public = stub.ListAdapters(pb.ListAdaptersRequest(), timeout=30)
        assert public.adapters and all(a.path == "" for a in public.adapters)
        admin = stub.ListAdapters(pb.ListAdaptersRequest(), timeout=30,
                                  metadata=(("authorization", f"Bearer {ADMIN_TOKEN}"),))
        assert all(a.path for a in admin.adapters)
        assert all(len(a.sha256) == 64 for a in admin.adapters if a.status == "ready")
