"""Adapter admin routes (vLLM-compatible) against the real server."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.support.adapters import make_adapter

from .conftest import ADMIN_TOKEN

pytestmark = pytest.mark.integration

ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}


def load(server, name: str, path, headers=ADMIN) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)},
                      headers=headers, timeout=60)


def unload(server, name: str) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": name}, headers=ADMIN, timeout=60)


def test_load_serve_replace_unload(server, client, hf_base_model, tmp_path, base_model_name):
    first = make_adapter(hf_base_model, tmp_path / "v1", seed=7001)
    second = make_adapter(hf_base_model, tmp_path / "v2", seed=7002)
    name = "hot-loaded"
    response = load(server, name, first)
    assert response.status_code == 200, response.text
    assert response.json()["adapter"]["version"] == 1
    assert name in {m.id for m in client.models.list().data}
    text_v1 = client.completions.create(model=name, prompt="Hello", max_tokens=8, temperature=0).choices[0].text

    response = load(server, name, second)  # same name: a new version replaces it
    assert response.status_code == 200 and response.json()["adapter"]["version"] == 2
    text_v2 = client.completions.create(model=name, prompt="Hello", max_tokens=8, temperature=0).choices[0].text
    assert text_v2 != text_v1, "requests after a replace must see the new weights"

    assert unload(server, name).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model=name, prompt="Hello", max_tokens=2)
    assert client.completions.create(model=base_model_name, prompt="Hello", max_tokens=2).choices[0].text


def test_admin_routes_need_the_token(server, adapter_dir):
    assert load(server, "x", adapter_dir / "adapter-0", headers={}).status_code == 401
    assert load(server, "x", adapter_dir / "adapter-0", headers={"authorization": "Bearer wrong"}).status_code == 401


@pytest.mark.parametrize("name, path_kind, message", [
    ("../escape", "good", "invalid adapter name"),
    ("bad-rank", "rank", "exceeds the server's max LoRA rank"),
    ("bad-pickle", "pickle", "pickle"),
    ("bad-path", "missing", "not a directory"),
    ("bad-relative", "relative-escape", "leaves the adapter directory"),
])
def test_bad_adapters_are_rejected_with_a_clear_message(server, client, adapter_dir, adapter_names, tmp_path,
                                                        name, path_kind, message):
    good = adapter_dir / adapter_names[0]
    path = {"good": str(good), "missing": str(tmp_path / "nope"), "relative-escape": "../../etc"}.get(path_kind)
    if path_kind == "rank":
        path = tmp_path / "rank"
        path.mkdir()
        (path / "adapter_model.safetensors").write_bytes((good / "adapter_model.safetensors").read_bytes())
        config = json.loads((good / "adapter_config.json").read_text())
        (path / "adapter_config.json").write_text(json.dumps({**config, "r": 512}))
    elif path_kind == "pickle":
        path = tmp_path / "pickle"
        path.mkdir()
        (path / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
        (path / "adapter_model.bin").write_bytes(b"\x80\x04not really")
    response = load(server, name, path)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]
    # The good adapters keep serving.
    assert client.completions.create(model=adapter_names[0], prompt="Hi", max_tokens=2).choices[0].text


def test_list_adapters_reports_status(server, adapter_names):
    listing = httpx.get(f"{server.url}/v1/adapters").json()
    by_name = {a["name"]: a for a in listing["data"]}
    assert by_name[adapter_names[0]]["status"] == "ready"
    assert by_name[adapter_names[0]]["rank"] == 8
