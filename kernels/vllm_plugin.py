"""Installs loraplex's batched-LoRA ops into vLLM through its plugin entry points.

vLLM calls :func:`register` (entry point group ``vllm.general_plugins``) in every process it
starts: the API process, the engine core and the workers. The choice between our ops and vLLM's
own is made by ``loraplex serve --lora-kernels``; :func:`select_lora_kernels` passes it to those
processes through their environment, which they inherit.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

SELECTION_ENV = "LORAPLEX_LORA_KERNELS"
COMPILED_OPS_ENV = "LORAPLEX_COMPILED_OPS_DIR"


def select_lora_kernels(name: str, compiled_ops_cache: Path | None = None) -> None:
    """Called before the engine starts: ``loraplex``, ``vllm`` or ``auto`` (ours on CPUs, vLLM's on
    GPUs). With ``compiled_ops_cache`` (our ops on a CPU), our compiled op for small steps is
    built there if missing, here, before the engine's processes start, and they load it (None:
    our torch ops only)."""
    os.environ[SELECTION_ENV] = name
    os.environ.pop(COMPILED_OPS_ENV, None)
    if name in ("auto", "loraplex") and compiled_ops_cache is not None and not _has_cuda():
        from . import native

        if native.load(compiled_ops_cache) is not None:
            os.environ[COMPILED_OPS_ENV] = str(compiled_ops_cache)
            logger.info("loraplex LoRA kernels: small steps run the compiled op")
        else:
            logger.info("loraplex LoRA kernels: torch ops only (no compiled op for this machine)")


def selected_lora_kernels() -> str:
    return os.environ.get(SELECTION_ENV, "vllm")


def compiled_ops_cache() -> Path | None:
    """Where the engine's processes find the compiled op (None: not selected)."""
    value = os.environ.get(COMPILED_OPS_ENV)
    return Path(value) if value else None


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def effective_lora_kernels() -> str:
    """Whose ops this process's engine runs: ``loraplex`` or ``vllm`` (``auto``: ours on CPUs,
    vLLM's on GPUs)."""
    selected = selected_lora_kernels()
    if selected == "auto":
        return "vllm" if _has_cuda() else "loraplex"
    return "loraplex" if selected == "loraplex" else "vllm"


def register() -> None:
    """vLLM plugin hook: point the platform's punica wrapper at ours when selected."""
    selected = selected_lora_kernels()
    if selected not in ("auto", "loraplex"):
        return
    _install_cpu_wrapper()
    if selected == "loraplex" and _has_cuda():
        _install_gpu_wrapper()


CPU_WRAPPER = "loraplex.kernels.cpu_wrapper.LoraplexPunicaWrapperCPU"
STOCK_CPU_WRAPPER = "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU"
GPU_WRAPPER = "loraplex.kernels.gpu_wrapper.LoraplexPunicaWrapperGPU"
STOCK_GPU_WRAPPER = "vllm.lora.punica_wrapper.punica_gpu.PunicaWrapperGPU"


def _install_gpu_wrapper() -> None:
    from vllm.platforms.cuda import CudaPlatformBase

    CudaPlatformBase.get_punica_wrapper = classmethod(lambda cls: GPU_WRAPPER)
    logger.info("loraplex LoRA kernels installed for the CUDA platform (pid %d)", os.getpid())


def _install_cpu_wrapper() -> None:
    from vllm.platforms.cpu import CpuPlatform

    CpuPlatform.get_punica_wrapper = classmethod(lambda cls: CPU_WRAPPER)
    logger.info("loraplex LoRA kernels installed for the CPU platform (pid %d)", os.getpid())
