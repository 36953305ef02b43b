"""Installs loraplex's batched-LoRA ops into vLLM through its plugin entry points.

vLLM calls :func:`register` (entry point group ``vllm.general_plugins``) in every process it
starts: the API process, the engine core and the workers. The choice between our ops and vLLM's
own is made by ``loraplex serve --lora-kernels``; :func:`select_lora_kernels` passes it to those
processes through their environment, which they inherit.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

SELECTION_ENV = "LORAPLEX_LORA_KERNELS"


def select_lora_kernels(name: str) -> None:
    """Called by the CLI before the engine starts: ``loraplex`` or ``vllm``."""
    os.environ[SELECTION_ENV] = name


def selected_lora_kernels() -> str:
    return os.environ.get(SELECTION_ENV, "vllm")


def register() -> None:
    """vLLM plugin hook: point the platform's punica wrapper at ours when selected."""
    if selected_lora_kernels() != "loraplex":
        return
    _install_cpu_wrapper()


CPU_WRAPPER = "loraplex.kernels.cpu_wrapper.LoraplexPunicaWrapperCPU"
STOCK_CPU_WRAPPER = "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU"


def _install_cpu_wrapper() -> None:
    from vllm.platforms.cpu import CpuPlatform

    CpuPlatform.get_punica_wrapper = classmethod(lambda cls: CPU_WRAPPER)
    logger.info("loraplex LoRA kernels installed for the CPU platform (pid %d)", os.getpid())
