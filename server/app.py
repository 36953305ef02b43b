"""Builds the running server: engine, adapter registry, service, front doors; one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .adapters.manager import AdapterLimits, AdapterManager
from .adapters.registry import AdapterError, AdapterRegistry
from .adapters.store import SnapshotStore
from .adapters.validation import BaseModelShapes
from .admission import AdmissionController
from .config import AdapterConfig, EngineConfig, ServerConfig
from .engine import Engine
from .http_api import build_app
from .http_protocol import bounded_h11_protocol
from .metrics import Metrics
from .prompts import PromptBuilder
from .service import GenerationService

logger = logging.getLogger(__name__)


@dataclass
class Server:
    engine: Engine
    registry: AdapterRegistry
    adapters: AdapterManager
    service: GenerationService
    temporary_store: bool  # the snapshot store is removed at exit


async def build_server(engine_config: EngineConfig, adapter_config: AdapterConfig, server_config: ServerConfig,
                       base_model_name: str) -> Server:
    metrics = Metrics(base_model_name, max_adapter_labels=server_config.metrics_max_adapters,
                      max_loras=engine_config.max_loras)
    engine = Engine.start(engine_config, on_stats=metrics.engine_step)
    engine.start_grammar_compiler()  # (in the background)
    registry = AdapterRegistry(base_model_name)
    limits = AdapterLimits(max_lora_rank=engine_config.max_lora_rank, max_cpu_loras=engine_config.max_cpu_loras,
                           served_dtype=engine.served_dtype, adapter_dtype=engine.adapter_dtype,
                           base_shapes=BaseModelShapes.from_model_dir(Path(engine_config.model_path)))
    store_dir = adapter_config.store_dir or Path(tempfile.mkdtemp(prefix="loraplex-adapters-"))
    adapters = AdapterManager(registry=registry, engine=engine, store=SnapshotStore(store_dir, limits.max_bytes),
                              limits=limits, adapter_dir=adapter_config.adapter_dir,
                              allowed_roots=adapter_config.allowed_roots, metrics=metrics)
    if adapter_config.adapter_dir is not None:
        await adapters.load_directory(adapter_config.adapter_dir, adapter_config.preload)
    for name in adapter_config.pinned:
        try:
            await adapters.pin(name)
        except AdapterError as exc:
            raise SystemExit(f"loraplex: --pin {name}: {exc}") from exc
    metrics.track_engine(engine.num_unfinished_requests)
    capture = None
    if server_config.capture_dir is not None:
        from .capture import CaptureWriter

        capture = CaptureWriter(server_config.capture_dir)
        logger.warning("capturing prompts and completions to %s (sensitive data)", server_config.capture_dir)
    admission_config = server_config.admission
    admission = AdmissionController(admission_config.max_concurrent, admission_config.max_queued,
                                    dict(admission_config.adapter_weights), admission_config.max_queue_wait_s)
    metrics.track_admission(admission.stats)
    service = GenerationService(
        engine=engine, adapters=adapters, prompts=PromptBuilder(engine.tokenizer, server_config.limits.max_chat_messages),
        limits=server_config.limits, metrics=metrics, admission=admission, base_model_name=base_model_name,
        max_model_len=engine_config.max_model_len, capture=capture)
    return Server(engine, registry, adapters, service, temporary_store=adapter_config.store_dir is None)


def _http_server(config, on_signal):
    """uvicorn's server, minus its habit of re-raising SIGTERM/SIGINT once it has stopped (which
    kills the process before the engine and its child processes are shut down); SIGTERM/SIGINT
    go to ``on_signal(server, sig)`` (which drains first)."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            loop = asyncio.get_running_loop()
            signals = (signal.SIGINT, signal.SIGTERM)
            for sig in signals:
                loop.add_signal_handler(sig, on_signal, self, sig)
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


class Drain:
    """SIGTERM/SIGINT: refuse new requests (503, health NOT_SERVING), let the admitted ones finish
    for at most ``timeout_s``, then stop the front doors. A second signal stops at once."""

    def __init__(self, service: GenerationService, timeout_s: float, on_start) -> None:
        self.service = service
        self.timeout_s = timeout_s
        self.on_start = on_start  # async callable: mark the gRPC health NOT_SERVING
        self.task: asyncio.Task | None = None

    def __call__(self, http, sig: int) -> None:
        if self.task is not None:
            logger.warning("second signal: stopping now")
            http.handle_exit(sig, None)
            return
        self.task = asyncio.ensure_future(self._drain(http, sig))

    async def _drain(self, http, sig: int) -> None:
        admission = self.service.admission
        admission.start_draining()
        stats = admission.stats()
        logger.info("draining: %d running, %d queued; waiting up to %.0f s", stats.running, stats.queued,
                    self.timeout_s)
        try:
            await self.on_start()
        except Exception:  # noqa: BLE001 - health is best effort; draining goes on
            logger.exception("could not mark gRPC health NOT_SERVING")
        if await admission.wait_idle(self.timeout_s):
            logger.info("drained")
        else:
            stats = admission.stats()
            logger.warning("drain timeout: %d running, %d queued requests are cut off", stats.running, stats.queued)
        http.handle_exit(sig, None)


async def _watch_engine(service: GenerationService, on_failure, interval_s: float = 1.0) -> None:
    """When the engine dies, say so once (log, gRPC health NOT_SERVING); /health turns 503 by itself
    and in-flight requests fail with 503 through the engine's own error."""
    while service.engine.healthy:
        await asyncio.sleep(interval_s)
    logger.error("the engine has failed: health is NOT_SERVING; restart the server")
    await on_failure()


async def run(engine_config: EngineConfig, adapter_config: AdapterConfig, server_config: ServerConfig,
              base_model_name: str) -> None:
    import uvicorn

    server = await build_server(engine_config, adapter_config, server_config, base_model_name)
    ready = asyncio.Event()
    app = build_app(server.service, server.adapters, server_config, is_ready=ready.is_set)
    grpc_server = health = None
    if server_config.grpc_port is not None:
        from .grpc_api import build_grpc_server, set_serving

        grpc_server, health = build_grpc_server(server.service, server.adapters, server_config,
                                                server_config.host, server_config.grpc_port)
        await grpc_server.start()
        await set_serving(health, True)
        logger.info("gRPC on %s:%d", server_config.host, server_config.grpc_port)

    async def not_serving() -> None:
        if health is not None:
            await set_serving(health, False)

    http = _http_server(uvicorn.Config(
        app, host=server_config.host, port=server_config.port, log_level=server_config.log_level,
        lifespan="off", timeout_graceful_shutdown=5, http=bounded_h11_protocol(server_config.header_timeout_s),
        h11_max_incomplete_event_size=server_config.max_header_bytes),
        Drain(server.service, server_config.drain_timeout_s, not_serving))
    background = [asyncio.ensure_future(_adapter_housekeeping(server.adapters, interval_s=1.0)),
                  asyncio.ensure_future(_watch_engine(server.service, not_serving))]
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
        server.service.prompts.close()
        if server.temporary_store:
            server.adapters.store.remove_all()
