"""Adapter admin routes (vLLM-compatible) against the real server."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.adapters import make_adapter, symlink_loop
from tests.support.server import wait_for

from .conftest import ADMIN_TOKEN

pytestmark = pytest.mark.integration

ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}


def load(server, name: str, path, headers=ADMIN) -> httpx.Response:
    # json.dumps escapes non-ASCII (httpx's json= would refuse a lone surrogate before sending)
    return httpx.post(f"{server.url}/v1/load_lora_adapter", content=json.dumps({"lora_name": name,
                                                                                "lora_path": str(path)}),
                      headers={"content-type": "application/json", **headers}, timeout=60)


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


def test_an_adapter_targeted_by_regex_loads_and_matches_hf_peft(server, client, hf_base_model, hf_tokenizer,
                                                               tmp_path, base_model_name):
    """PEFT writes ``target_modules`` as a regex string when one is given (here: the attention
    projections of the even layers only); such an adapter is valid and serves what HF+peft does."""
    from tests.support.adapters import greedy_with_adapter

    path = make_adapter(hf_base_model, tmp_path / "regex", seed=7003,
                        targets=r".*layers\.\d*[02468]\.self_attn\.(q_proj|k_proj|v_proj|o_proj)")
    assert isinstance(json.loads((path / "adapter_config.json").read_text())["target_modules"], str)
    response = load(server, "regex-targeted", path)
    assert response.status_code == 200, response.text
    assert response.json()["adapter"]["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    try:
        prompt = "The three primary colours are"
        served = client.completions.create(model="regex-targeted", prompt=prompt, max_tokens=12,
                                           temperature=0).choices[0].text
        expected = greedy_with_adapter(hf_base_model, hf_tokenizer, path, prompt, 12)
        assert served == hf_tokenizer.decode(expected)
        assert served != client.completions.create(model=base_model_name, prompt=prompt, max_tokens=12,
                                                   temperature=0).choices[0].text, "adapter not applied"
    finally:
        assert unload(server, "regex-targeted").status_code == 200


def test_admin_routes_need_the_token(server, adapter_dir):
    assert load(server, "x", adapter_dir / "adapter-0", headers={}).status_code == 401
    assert load(server, "x", adapter_dir / "adapter-0", headers={"authorization": "Bearer wrong"}).status_code == 401


def _copy_good(good: Path, dst: Path, config_changes: dict | None = None) -> Path:
    dst.mkdir()
    (dst / "adapter_model.safetensors").write_bytes((good / "adapter_model.safetensors").read_bytes())
    config = json.loads((good / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**config, **(config_changes or {})}))
    return dst


def _corrupt(good: Path, dst: Path, mutate) -> Path:
    _copy_good(good, dst)
    weights = dst / "adapter_model.safetensors"
    weights.write_bytes(mutate(weights.read_bytes()))
    return dst


def _wrong_shapes(good: Path, dst: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    _copy_good(good, dst)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    save_file({key: torch.zeros(8, 1024)}, str(dst / "adapter_model.safetensors"))  # hidden 1024, not 576
    return dst


def _symlinked_weights(good: Path, dst: Path) -> Path:
    dst.mkdir()
    (dst / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    (dst / "adapter_model.safetensors").symlink_to(good / "adapter_model.safetensors")  # outside dst
    return dst


def _looped_path(good: Path, dst: Path) -> str:
    dst.mkdir()
    return str(symlink_loop(dst / "adapter"))  # resolving it never ends: pathlib raises RuntimeError


def _looped_weights(good: Path, dst: Path) -> Path:
    dst.mkdir()
    (dst / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    symlink_loop(dst / "adapter_model.safetensors")
    return dst


def _pickle_only(good: Path, dst: Path) -> Path:
    dst.mkdir()
    (dst / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    (dst / "adapter_model.bin").write_bytes(b"\x80\x04not really")
    return dst


def _no_config(good: Path, dst: Path) -> Path:
    _copy_good(good, dst)
    (dst / "adapter_config.json").unlink()
    return dst


BAD_ADAPTERS = {  # name -> (build(good, dst) -> path or str, expected message)
    "../escape": (lambda good, dst: good, "invalid adapter name"),
    "bad-rank": (lambda good, dst: _copy_good(good, dst, {"r": 512}), "exceeds the server's max LoRA rank"),
    "bad-pickle": (_pickle_only, "pickle"),
    "bad-missing": (lambda good, dst: str(dst / "nope"), "not a directory"),
    "bad-relative": (lambda good, dst: "../../etc", "leaves the adapter directory"),
    "bad-surrogate-path": (lambda good, dst: f"{dst}\ud800", "lora_path"),
    "bad-truncated": (lambda good, dst: _corrupt(good, dst, lambda b: b[: len(b) // 2]), "truncated"),
    "bad-header": (lambda good, dst: _corrupt(good, dst, lambda b: b[:8] + b"{garbage" + b[16:]), "corrupt"),
    "bad-no-config": (_no_config, "adapter_config.json is missing"),
    "bad-module": (lambda good, dst: _copy_good(good, dst, {"target_modules": ["q_proj", "conv_proj"]}),
                   "not linear layers of the base model"),
    "bad-shapes": (_wrong_shapes, "another base model"),
    "bad-dora": (lambda good, dst: _copy_good(good, dst, {"use_dora": True}), "DoRA"),
    "bad-modules-to-save": (lambda good, dst: _copy_good(good, dst, {"modules_to_save": ["lm_head"]}),
                            "modules_to_save"),
    "bad-bias": (lambda good, dst: _copy_good(good, dst, {"bias": "all"}), "bias"),
    "bad-symlink": (_symlinked_weights, "symlink that leaves the adapter directory"),
    "bad-symlink-loop-path": (_looped_path, "cannot be resolved"),
    "bad-symlink-loop-weights": (_looped_weights, "cannot be resolved"),
    "bad-peft-type": (lambda good, dst: _copy_good(good, dst, {"peft_type": "IA3"}), "not supported"),
}


@pytest.mark.parametrize("name", list(BAD_ADAPTERS))
def test_bad_adapters_are_rejected_with_a_clear_message(server, client, adapter_dir, adapter_names, tmp_path, name):
    build, message = BAD_ADAPTERS[name]
    path = build(adapter_dir / adapter_names[1], tmp_path / "adapter")
    response = load(server, name, path)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]
    # The good adapters keep serving.
    assert client.completions.create(model=adapter_names[1], prompt="Hi", max_tokens=2).choices[0].text


def test_watched_directory_loads_replaces_and_unloads(server, client, adapter_dir, hf_base_model, tmp_path):
    def watched():
        return {a["name"]: a for a in httpx.get(f"{server.url}/v1/adapters").json()["data"]}.get("watched")

    staging = adapter_dir / ".staging-watched"  # hidden names are ignored until published
    make_adapter(hf_base_model, staging, seed=8001)
    staging.rename(adapter_dir / "watched")
    assert wait_for(lambda: (watched() or {}).get("status") == "ready"), "new directory not loaded"
    first = client.completions.create(model="watched", prompt="Hello", max_tokens=8, temperature=0).choices[0].text

    replacement = make_adapter(hf_base_model, tmp_path / "v2", seed=8002)
    shutil.copy(replacement / "adapter_model.safetensors", adapter_dir / "watched" / "adapter_model.safetensors")
    assert wait_for(lambda: (watched() or {}).get("version") == 2), "changed directory not reloaded"
    second = client.completions.create(model="watched", prompt="Hello", max_tokens=8, temperature=0).choices[0].text
    assert second != first

    shutil.rmtree(adapter_dir / "watched")
    assert wait_for(lambda: watched() is None), "removed directory not unloaded"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="watched", prompt="Hello", max_tokens=2)


def test_pinned_adapter_is_reported(server):
    adapters = {a["name"]: a for a in httpx.get(f"{server.url}/v1/adapters").json()["data"]}
    assert adapters["adapter-0"]["pinned"] is True
    assert adapters["adapter-1"]["pinned"] is False


def test_list_adapters_reports_status(server, adapter_names):
    listing = httpx.get(f"{server.url}/v1/adapters").json()
    by_name = {a["name"]: a for a in listing["data"]}
    assert by_name[adapter_names[0]]["status"] == "ready"
    assert by_name[adapter_names[0]]["rank"] == 8


def test_load_and_replace_under_traffic_lose_no_request(server, base_model_name, adapter_dir, adapter_names,
                                                         hf_base_model, tmp_path):
    """Traffic to other adapters (and to the one being replaced) while adapters are loaded,
    unloaded and replaced: zero failed requests, and each new adapter answers right after its load."""
    import asyncio

    from loraplex.loadtest.churn import ChurnConfig
    from loraplex.loadtest.runner import RunConfig, report, run_with_churn
    from loraplex.loadtest.workload import WorkloadConfig

    versions = [make_adapter(hf_base_model, tmp_path / f"replace-v{i}", seed=9000 + i) for i in range(2)]
    assert load(server, "replaced", versions[0]).status_code == 200
    workload = WorkloadConfig(models=(base_model_name, adapter_names[2], adapter_names[3], "replaced"), rate=4.0,
                              num_requests=40, seed=2, prompt_len=(8, 16), output_len=(4, 4))
    config = RunConfig(url=server.url, workload=workload, duration_s=5.0,
                       churn=ChurnConfig((adapter_dir / adapter_names[4], adapter_dir / adapter_names[5]),
                                         ADMIN_TOKEN, interval_s=1.0))

    async def replace_while_running():
        async def replacer():
            for i in range(4):
                await asyncio.sleep(1.0)
                response = await asyncio.to_thread(load, server, "replaced", versions[(i + 1) % 2])
                assert response.status_code == 200, response.text

        replacing = asyncio.ensure_future(replacer())
        results, churn_records = await run_with_churn(config)
        await replacing
        return results, churn_records

    results, churn_records = asyncio.run(replace_while_running())
    result = report(results, config)
    assert result["failed"] == 0, result["errors"]
    assert result["completed"] == len(results) > 10
    assert len(churn_records) >= 3 and all("error" not in r for r in churn_records), churn_records
    assert all(r["load_to_first_token_s"] >= r["load_s"] > 0 for r in churn_records)
    listing = {a["name"]: a for a in httpx.get(f"{server.url}/v1/adapters").json()["data"]}
    assert listing["replaced"]["version"] == 5
    assert not any(name.startswith("churn-") for name in listing)  # the churn cleaned up after itself
    assert unload(server, "replaced").status_code == 200
