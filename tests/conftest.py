"""Fixtures shared by every test directory."""

from __future__ import annotations

import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # Triton kernels run in the interpreter on CPU; it must be on before anything imports them
    # (and before vLLM imports triton).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from server import default_model


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    return default_model.default_cache_dir()


@pytest.fixture(scope="session")
def base_model_dir(cache_dir: Path) -> Path:
    """The embedded default model, converted once (shared with the server under test)."""
    return default_model.ensure_default_model(cache_dir)
