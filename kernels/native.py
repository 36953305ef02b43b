"""Builds and loads loraplex's compiled CPU LoRA op (``csrc/lora_small.cpp``): one call per
layer for small steps, where a dozen torch ops from Python cost more than the arithmetic.

Built once by the install script into the environment (``python -m loraplex.kernels.native
--prefix``: ``<env>/share/loraplex``), else on first use into loraplex's cache. Compiled for
x86-64-v3 (AVX2 + FMA), loaded only where the CPU has them; anywhere else :func:`load` returns
None and the torch ops are used.
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import hashlib
import importlib.util
import logging
import os
import sys
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "lora_small.cpp"
# Reassociation lets the compiler vectorise the dot products; NaN and Inf still propagate
# (no -ffinite-math-only): a broken adapter's tokens show it, the others are not touched.
CFLAGS = ["-O3", "-march=x86-64-v3", "-fopenmp", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
          "-fno-trapping-math"]
SUPPORTED_CAPABILITIES = ("AVX2", "AVX512")

_loaded: dict[Path, object] = {}


def cpu_supported() -> bool:
    import platform

    return (platform.machine() in ("x86_64", "AMD64")
            and torch.backends.cpu.get_cpu_capability() in SUPPORTED_CAPABILITIES)


def can_build() -> bool:
    """A C++ compiler is on PATH (torch's extension builder uses ``$CXX``, else ``c++``)."""
    import shutil

    return shutil.which(os.environ.get("CXX", "c++")) is not None


@functools.cache
def _build_name() -> str:
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(CFLAGS).encode() + torch.__version__.encode())
    return f"lora_small-{digest.hexdigest()[:16]}"


def build_dir(cache_root: Path) -> Path:
    """One folder per source, flags and torch version: a stale build is never loaded."""
    return cache_root / "native" / _build_name()


def module_name(directory: Path) -> str:
    return "loraplex_lora_small_" + directory.name.rsplit("-", 1)[1]


def build(cache_root: Path) -> Path:
    """Compile into the cache (under a lock: several processes may start at once); returns the .so."""
    from torch.utils import cpp_extension

    directory = build_dir(cache_root)
    directory.mkdir(parents=True, exist_ok=True)
    name = module_name(directory)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        built = _built_library(directory, name)
        if built is None:
            logger.info("building loraplex's CPU LoRA op in %s (once per machine)", directory)
            # The build runs ninja: the environment's own (a dependency of vLLM) when none is on PATH.
            os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
            cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=CFLAGS, build_directory=str(directory),
                               is_python_module=True)
            built = _built_library(directory, name)
    if built is None:
        raise RuntimeError(f"the build left no library in {directory}")
    return built


def _built_library(directory: Path, name: str) -> Path | None:
    candidates = sorted(directory.glob(f"{name}*.so"))
    return candidates[0] if candidates else None


def environment_root() -> Path:
    """Where the install script builds it: inside the Python environment (images run as another
    user, with another cache)."""
    return Path(sys.prefix) / "share" / "loraplex"


def load(cache_root: Path, build_if_missing: bool = True):
    """The compiled module, or None where it cannot be used (not x86-64 with AVX2, no compiler).
    Looks in the environment first, then in ``cache_root`` (where a missing build is made)."""
    if not cpu_supported():
        return None
    directory = build_dir(cache_root)
    if directory in _loaded:
        return _loaded[directory]
    name = module_name(directory)
    library = _built_library(build_dir(environment_root()), name) or _built_library(directory, name)
    try:
        if library is None and build_if_missing:
            library = build(cache_root)
        module = None
        if library is not None:
            spec = importlib.util.spec_from_file_location(name, library)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - no compiler, no headers: the torch ops still work
        logger.warning("loraplex's compiled CPU LoRA op is unavailable (%s); using the torch ops", exc)
        module = None
    if module is not None or build_if_missing:  # a lookup without building may be followed by a build
        _loaded[directory] = module
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build loraplex's compiled CPU LoRA op.")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--prefix", action="store_true", help=f"into the environment ({environment_root()})")
    where.add_argument("--cache-dir", type=Path, default=None, help="into this cache folder")
    args = parser.parse_args(argv)
    if not cpu_supported():
        print(f"skipped: this CPU ({torch.backends.cpu.get_cpu_capability()}) runs the torch ops")
        return 0
    print(build(environment_root() if args.prefix else args.cache_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
