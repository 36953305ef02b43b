"""Builds the running server: engine, adapter registry, service, front doors; one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass
from pathlib import Path

from .adapters.manager import AdapterManager
from .adapters.registry import AdapterError, AdapterRegistry
from .adapters.validation import BaseModelShapes
from .config import AdapterConfig, EngineConfig, ServerConfig
from .engine import Engine
from .http_api import build_app
from .metrics import Metrics
from .service import GenerationService

logger = logging.getLogger(__name__)


@dataclass
class Server:
    engine: Engine
    registry: AdapterRegistry
    adapters: AdapterManager
    service: GenerationService


async def build_server(engine_config: EngineConfig, adapter_config: AdapterConfig, server_config: ServerConfig,
                       base_model_name: str) -> Server:
    metrics = Metrics(base_model_name, max_adapter_labels=server_config.metrics_max_adapters,
                      max_loras=engine_config.max_loras)
    engine = Engine.start(engine_config, on_stats=metrics.engine_step)
    registry = AdapterRegistry(base_model_name)
    adapters = AdapterManager(registry, engine, engine_config.max_lora_rank, engine_config.max_cpu_loras,
                              adapter_config.adapter_dir, adapter_config.allowed_roots,
                              BaseModelShapes.from_model_dir(Path(engine_config.model_path)), metrics)
    if adapter_config.adapter_dir is not None:
        await adapters.load_directory(adapter_config.adapter_dir, adapter_config.preload)
    for name in adapter_config.pinned:
        try:
            await adapters.pin(name)
        except AdapterError as exc:
            raise SystemExit(f"loraplex: --pin {name}: {exc}") from exc
    metrics.track_engine(engine.num_unfinished_requests)
    service = GenerationService(engine, registry, server_config.limits, metrics, base_model_name,
                                engine_config.max_model_len)
    return Server(engine, registry, adapters, service)


def _http_server(config):
    """uvicorn's server, minus its habit of re-raising SIGTERM/SIGINT once it has stopped (which
    kills the process before the engine and its child processes are shut down)."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            loop = asyncio.get_running_loop()
            signals = (signal.SIGINT, signal.SIGTERM)
            for sig in signals:
                loop.add_signal_handler(sig, self.handle_exit, sig, None)
            try:
                yield
            finally:
                for sig in signals:
                    loop.remove_signal_handler(sig)

    return Server(config)


async def _adapter_housekeeping(adapters: AdapterManager, interval_s: float) -> None:
    """Every interval: keep pinned adapters warm, refresh the adapter gauges."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await adapters.keep_pinned_warm()
            await adapters.refresh_metrics()
        except Exception:  # never let the keeper die; the next round tries again
            logger.exception("adapter housekeeping failed")


async def run(engine_config: EngineConfig, adapter_config: AdapterConfig, server_config: ServerConfig,
              base_model_name: str) -> None:
    import uvicorn

    server = await build_server(engine_config, adapter_config, server_config, base_model_name)
    ready = asyncio.Event()
    app = build_app(server.service, server.adapters, server_config, is_ready=ready.is_set)
    http = _http_server(uvicorn.Config(
        app, host=server_config.host, port=server_config.port, log_level=server_config.log_level,
        lifespan="off", timeout_graceful_shutdown=30))
    grpc_server = health = None
    if server_config.grpc_port is not None:
        from .grpc_api import build_grpc_server, set_serving

        grpc_server, health = build_grpc_server(server.service, server.adapters, server_config,
                                                server_config.host, server_config.grpc_port)
        await grpc_server.start()
        await set_serving(health, True)
        logger.info("gRPC on %s:%d", server_config.host, server_config.grpc_port)
    background = [asyncio.ensure_future(_adapter_housekeeping(server.adapters, interval_s=1.0))]
    if adapter_config.adapter_dir is not None and adapter_config.watch_interval_s > 0:
        from .adapters.watcher import AdapterDirWatcher

        watcher = AdapterDirWatcher(server.adapters, adapter_config.adapter_dir, adapter_config.watch_interval_s)
        watcher.mark_loaded([e.name for e in server.registry.adapters()])
        background.append(asyncio.ensure_future(watcher.run()))
    ready.set()
    logger.info("serving %s on http://%s:%d", base_model_name, server_config.host, server_config.port)
    try:
        await http.serve()
    finally:
        ready.clear()
        for task in background:
            task.cancel()
        if grpc_server is not None:
            await set_serving(health, False)
            await grpc_server.stop(grace=5)
        server.engine.shutdown()
