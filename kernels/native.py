"""Builds and loads loraplex's compiled CPU LoRA op (``csrc/lora_small.cpp``): one call per
layer for small steps, where a dozen torch ops from Python cost more than the arithmetic.

Built once by the install script into the environment (``python -m loraplex.kernels.native
--prefix``: ``<env>/share/loraplex``), else on first use into loraplex's cache. Two builds of one
source (:data:`VARIANTS`): x86-64-v3 (AVX2 + FMA) everywhere the op runs, and x86-64-v4 with
AVX512-BF16 where the CPU has it (bfloat16 tiles of 4+ tokens shrink with ``vdpbf16ps``, 1.1-1.4x
faster on prefill runs). The best build this CPU can run is loaded, a prebuilt one before a new
build; on a CPU without AVX2 :func:`load` returns None and the torch ops are used.
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
CFLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math"]
# Build name -> its target flags, best first. A build is loaded only on a CPU that has its
# instructions (:func:`host_variants`).
VARIANTS = {"avx512bf16": ["-march=x86-64-v4", "-mavx512bf16"], "avx2": ["-march=x86-64-v3"]}
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


def host_variants() -> list[str]:
    """The builds this CPU can run, best first (none without AVX2)."""
    if not cpu_supported():
        return []
    has_bf16 = torch.backends.cpu.get_cpu_capability() == "AVX512" and torch.cpu._is_avx512_bf16_supported()
    return [name for name in VARIANTS if name != "avx512bf16" or has_bf16]


def flags(variant: str) -> list[str]:
    return CFLAGS + VARIANTS[variant]


@functools.cache
def _build_name(variant: str) -> str:
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags(variant)).encode() + torch.__version__.encode())
    return f"lora_small-{variant}-{digest.hexdigest()[:16]}"


def build_dir(cache_root: Path, variant: str = "avx2") -> Path:
    """One folder per source, build, flags and torch version: a stale build is never loaded."""
    return cache_root / "native" / _build_name(variant)


def module_name(directory: Path) -> str:
    return "loraplex_lora_small_" + directory.name.rsplit("-", 1)[1]


def build(cache_root: Path, variant: str = "avx2") -> Path:
    """Compile into the cache (under a lock: several processes may start at once); returns the .so."""
    from torch.utils import cpp_extension

    directory = build_dir(cache_root, variant)
    directory.mkdir(parents=True, exist_ok=True)
    name = module_name(directory)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        built = _built_library(directory, name)
        if built is None:
            logger.info("building loraplex's CPU LoRA op (%s) in %s (once per machine)", variant, directory)
            # The build runs ninja: the environment's own (a dependency of vLLM) when none is on PATH.
            os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
            cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=flags(variant), build_directory=str(directory),
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


def load(cache_root: Path, build_if_missing: bool = True, variant: str | None = None):
    """The compiled module, or None where it cannot be used (not x86-64 with AVX2, no compiler).
    The best build this CPU runs (or only ``variant``, where it runs) that is already made (in the
    environment, then in ``cache_root``); else, when allowed, a new build in ``cache_root``, the
    best that compiles."""
    variants = [name for name in host_variants() if variant is None or name == variant]
    for variant in variants:
        module = _load_variant(cache_root, variant, build_missing=False)
        if module is not None:
            return module
    if build_if_missing:
        for variant in variants:
            module = _load_variant(cache_root, variant, build_missing=True)
            if module is not None:
                return module
    return None


def _load_variant(cache_root: Path, variant: str, build_missing: bool):
    directory = build_dir(cache_root, variant)
    if directory in _loaded:
        return _loaded[directory]
    name = module_name(directory)
    library = _built_library(build_dir(environment_root(), variant), name) or _built_library(directory, name)
    try:
        if library is None and build_missing:
            library = build(cache_root, variant)
        module = None
        if library is not None:
            spec = importlib.util.spec_from_file_location(name, library)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            module.variant = variant  # which build: the wrapper's limits depend on it
    except Exception as exc:  # noqa: BLE001 - no compiler, no headers: the torch ops still work
        logger.warning("loraplex's compiled CPU LoRA op (%s) is unavailable (%s)", variant, exc)
        module = None
    if module is not None or build_missing:  # a lookup without building may be followed by a build
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
    root = environment_root() if args.prefix else args.cache_dir
    built = 0
    for variant in host_variants():  # each build this CPU can run (an image may run on an older one)
        try:
            print(build(root, variant))
            built += 1
        except Exception as exc:  # noqa: BLE001 - e.g. a compiler without -mavx512bf16: the others still load
            print(f"{variant}: not built ({exc})", file=sys.stderr)
    return 0 if built else 1


if __name__ == "__main__":
    sys.exit(main())
