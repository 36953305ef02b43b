"""`loraplex train` end to end: a tiny adapter trained on generated demo data (loss goes down),
hot-loaded into the real server with --serve-url, then served through the OpenAI API; and
--capture-dir turning served traffic into training data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from loraplex.server.training import data, demo
from loraplex.server.training.demo import write_demo_data
from tests.support.adapters import load_base_model

from .conftest import ADMIN_TOKEN

REPO = Path(__file__).resolve().parents[2]


def tokenizer_of(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def hf_peft_greedy(base_model_dir: Path, adapter_dir: Path, examples, max_new_tokens: int) -> list[str]:
    """Greedy completions from HF transformers + peft (float32): the evaluation's oracle."""
    import torch
    from peft import PeftModel

    tokenizer = tokenizer_of(base_model_dir)
    model = PeftModel.from_pretrained(load_base_model(base_model_dir, dtype="float32"), adapter_dir).eval()
    outputs = []
    with torch.no_grad():
        for example in examples:
            ids = tokenizer(example.prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
            out = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                                 top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id)
            outputs.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return outputs


def test_train_a_tiny_adapter_and_serve_it(tmp_path, server, client, cache_dir, base_model_dir):
    train_path, eval_path = write_demo_data(tmp_path / "data", num_train=48, num_eval=4, seed=7)
    schema_path = tmp_path / "schema.json"
    schema_path.write_text(json.dumps(demo.SCHEMA))
    out = tmp_path / "loan-extractor"
    result = subprocess.run(
        [sys.executable, "-m", "loraplex.server.cli", "train", "--data", str(train_path), "--eval", str(eval_path),
         "--out", str(out), "--cache-dir", str(cache_dir), "--preset", "demo", "--rank", "8",
         "--batch-size", "8", "--max-steps", "6", "--eval-generate", "2", "--eval-max-new-tokens", "40",
         "--eval-schema", str(schema_path), "--quiet", "--serve-url", server.url, "--admin-token", ADMIN_TOKEN],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "hot-loaded as 'loan-extractor'" in result.stdout
    assert "Traceback" not in result.stderr, result.stderr[-3000:]  # none at exit either (vLLM's __del__)

    assert (out / "adapter_model.safetensors").is_file() and not list(out.glob("*.bin"))
    report = json.loads((out / "training_report.json").read_text())
    training = report["training"]
    assert training["steps"] == 6
    assert training["loss_last"] < training["loss_first"], training["losses"]
    assert report["adapter"]["loss"] < report["base"]["loss"]
    assert report["evaluation"]["engine"] == "vllm" and report["evaluation"]["generations"] == 8
    # the kernels that serve: on an x86-64 CPU with AVX2, the compiled op for small steps too
    from loraplex.kernels import native
    assert report["evaluation"]["compiled_op"] == (native.load(cache_dir) is not None)
    assert report["evaluation"]["kernels"] == "loraplex"  # `auto` on a CPU
    for label in ("base+schema", "adapter+schema"):  # forced into the schema (compact, in its key order)
        assert report[label]["num_generated"] == 2
        for sample in report[label]["samples"]:
            assert sample["prediction"].startswith('{"payoff_amount":'), sample
    if report["evaluation"]["dtype"] == "float32":  # HF+peft (float32) is the oracle of the engine's greedy text
        assert [s["prediction"] for s in report["adapter"]["samples"]] == hf_peft_greedy(
            base_model_dir, out, data.load_examples(eval_path, tokenizer_of(base_model_dir))[:2], max_new_tokens=40)

    served = {m.id for m in client.models.list().data}
    assert "loan-extractor" in served
    prompt = data.read_records(eval_path)[0]["messages"][:-1]
    reply = client.chat.completions.create(model="loan-extractor", messages=prompt, max_tokens=40, temperature=0)
    assert reply.model == "loan-extractor"
    assert reply.choices[0].message.content.strip()


def test_capture_dir_records_served_chat_in_training_format(server, client, adapter_names, capture_dir):
    adapter = adapter_names[2]
    messages = [{"role": "user", "content": "Name a colour."}]
    reply = client.chat.completions.create(model=adapter, messages=messages, max_tokens=8, temperature=0)
    client.completions.create(model=adapter, prompt="The sky is", max_tokens=4, temperature=0)
    records = data.read_records(capture_dir / f"{adapter}.jsonl")
    chats = [r for r in records if "messages" in r]
    assert {"messages": [*messages, {"role": "assistant", "content": reply.choices[0].message.content}]} in chats
    assert any(r.get("prompt") == "The sky is" and r["completion"] for r in records)


def test_same_seed_same_adapter(tmp_path, base_model_dir):
    from safetensors.torch import load_file

    from loraplex.server.config import TrainConfig
    from loraplex.server.training.trainer import train

    train_path, _ = write_demo_data(tmp_path / "data", num_train=8, num_eval=1, seed=3)
    weights = []
    for run in ("a", "b"):
        config = TrainConfig(train_path=train_path, out_dir=tmp_path / run, rank=4, alpha=8, batch_size=4,
                             max_length=192, max_steps=2, learning_rate=1e-3, seed=11, target_modules=("q_proj",))
        train(config, base_model_dir, progress=False)
        weights.append(load_file(tmp_path / run / "adapter_model.safetensors"))
    assert weights[0].keys() == weights[1].keys() and weights[0]
    for name, tensor in weights[0].items():
        assert tensor.equal(weights[1][name]), name
    assert any(t.abs().sum() > 0 for name, t in weights[0].items() if "lora_B" in name)  # it did train
