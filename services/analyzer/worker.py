"""Runs the analyzer as a faust worker, with its sidecar: metrics and routing watch."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import faust
from mode import Service

from services.analyzer.app import Analyzer
from services.analyzer.metrics import MetricsSnapshot, start_metrics_server
from services.analyzer.settings import AnalyzerSettings

logger = logging.getLogger(__name__)

SNAPSHOT_TIMEOUT_S = 5.0


class Sidecar(Service):
    """What runs beside the faust app: the metrics server and the routing watcher."""

    def __init__(self, analyzer: Analyzer, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._analyzer = analyzer
        self._stop = asyncio.Event()
        self._watch_task: asyncio.Task[None] | None = None
        self._server: Any = None
        self._last_snapshot = MetricsSnapshot()

    async def on_start(self) -> None:
        loop = asyncio.get_running_loop()
        settings = self._analyzer.settings

        def read_snapshot() -> MetricsSnapshot:
            future = asyncio.run_coroutine_threadsafe(self._analyzer.snapshot(), loop)
            try:
                self._last_snapshot = future.result(SNAPSHOT_TIMEOUT_S)
            except TimeoutError:
                future.cancel()
                logger.warning("metrics snapshot timed out, serving the previous one")
            return self._last_snapshot

        self._server, _ = start_metrics_server(
            settings.metrics_host, settings.metrics_port, read_snapshot
        )
        self._watch_task = asyncio.create_task(
            self._analyzer.watcher.watch_loop(self._stop)
        )

    async def on_stop(self) -> None:
        self._stop.set()
        if self._watch_task is not None:
            try:
                await asyncio.wait_for(self._watch_task, 5.0)
            except TimeoutError:
                logger.warning("routing watcher did not stop in 5 s, cancelled")
        await self._analyzer.judge.close()
        if self._server is not None:
            await asyncio.to_thread(self._server.shutdown)
            self._server.server_close()


def run(settings: AnalyzerSettings) -> None:
    """Run the analyzer as a faust worker until SIGTERM/SIGINT; exits the process."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    analyzer = Analyzer(settings)
    logger.info(
        "analyzer starting app_id=%s %s",
        settings.app_id,
        settings.model_dump_json(
            exclude={"control": {"token"}, "kafka": {"sasl_password"}}
        ),
    )
    worker = faust.Worker(
        analyzer.app,
        Sidecar(analyzer, loop=loop),
        loop=loop,
        loglevel=settings.logging.level,
        quiet=True,
        redirect_stdouts=False,
        override_logging=False,
    )
    worker.execute_from_commandline()
