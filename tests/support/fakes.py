"""Fakes for unit tests of the request path (a unit under test only; integration tests use the
real engine): an engine that echoes tokens, and a character-level tokenizer."""

from __future__ import annotations

import asyncio
from pathlib import Path

from loraplex.server.adapters.registry import AdapterRegistry
from loraplex.server.adapters.store import SnapshotStore
from loraplex.server.engine import AdapterRejected, GenerationChunk


class FakeTokenizer:
    """One token per character (ids = code points below 1000); ``<|s|>`` is a special token (id 999)."""

    all_special_tokens = ["<|s|>"]

    def get_vocab(self) -> dict[str, int]:
        return {chr(i): i for i in range(32, 999)} | {"<|s|>": 999}

    def get_added_vocab(self) -> dict[str, int]:
        return {"<|s|>": 999}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids, i = [], 0
        while i < len(text):
            if text.startswith("<|s|>", i):
                ids.append(999)
                i += 5
            else:
                ids.append(min(ord(text[i]), 998))
                i += 1
        return ids

    def __call__(self, text: str, add_special_tokens: bool = True, split_special_tokens: bool = False):
        class Encoding:
            input_ids = [min(ord(c), 998) for c in text] if split_special_tokens else self.encode(text)

        return Encoding()

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True) -> str:
        return "".join(f"<|s|>{m['role']}:{m['content']}" for m in messages) + "<|s|>assistant:"


class FakeEngine:
    """Generates ``max_tokens`` tokens (each the prompt's first id) per choice, ``delay_s`` apart."""

    def __init__(self, delay_s: float = 0.0, refuse: set[str] = frozenset()) -> None:
        self.tokenizer = FakeTokenizer()
        self.served_dtype = "float32"
        self.adapter_dtype = "float32"
        self.delay_s = delay_s
        self.refuse = set(refuse)  # adapter names the engine's loader refuses
        self.resident: set[int] = set()
        self.removed: list[int] = []
        self.requests: list[tuple[str, str | None]] = []  # (request id, adapter path) as generated
        self.fail_next: Exception | None = None

    async def check_options(self, options, tenant: str = "", num_sequences: int = 1) -> None:
        if options.n > 1 and options.temperature == 0:
            raise ValueError("n > 1 needs temperature > 0")

    def check_adapter(self, path: Path, expected_modules) -> None:
        pass

    async def add_adapter(self, adapter) -> None:
        if adapter.name in self.refuse:
            raise AdapterRejected("the loader refuses it")
        self.resident.add(adapter.adapter_slot)

    async def ensure_adapter(self, adapter) -> bool:
        if adapter.adapter_slot in self.resident:
            return True
        await self.add_adapter(adapter)
        return False

    async def remove_adapter(self, adapter) -> None:
        self.resident.discard(adapter.adapter_slot)
        self.removed.append(adapter.adapter_slot)

    async def refresh_residency(self) -> tuple[int, int]:
        return len(self.resident), 0

    async def generate(self, prompt_token_ids, options, request_id, adapter=None):
        self.requests.append((request_id, None if adapter is None else str(adapter.snapshot_path)))
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error
        for step in range(options.max_tokens):
            await asyncio.sleep(self.delay_s)
            last = step == options.max_tokens - 1
            for index in range(options.n):
                yield GenerationChunk(index=index, text="x", token_ids=[prompt_token_ids[0]],
                                      finish_reason="length" if last else None)


def make_adapter_dir(root: Path, name: str, seed: int = 0) -> Path:
    """A tiny valid PEFT-style adapter directory (no base-model shapes are checked in unit tests)."""
    import json

    import torch
    from safetensors.torch import save_file

    directory = root / name
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}))
    generator = torch.Generator().manual_seed(seed)
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 8, generator=generator),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(8, 4, generator=generator)},
              str(directory / "adapter_model.safetensors"))
    return directory


def make_manager(tmp_path: Path, engine: FakeEngine, metrics=None):
    from loraplex.server.adapters.manager import AdapterLimits, AdapterManager

    return AdapterManager(registry=AdapterRegistry("base"), engine=engine,
                          store=SnapshotStore(tmp_path / "store", 1 << 20),
                          limits=AdapterLimits(max_lora_rank=16, max_cpu_loras=4, served_dtype="float32"),
                          metrics=metrics)
