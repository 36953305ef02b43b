"""Fixtures shared by every test directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraplex.server import default_model


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    return default_model.default_cache_dir()


@pytest.fixture(scope="session")
def base_model_dir(cache_dir: Path) -> Path:
    """The embedded default model, converted once (shared with the server under test)."""
    return default_model.ensure_default_model(cache_dir)
