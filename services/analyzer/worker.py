"""Runs the analyzer as a faust worker, with its sidecar: metrics and routing watch."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import faust
from mode import Service

from services.analyzer.app import Analyzer
from services.analyzer.metrics import MetricsSnapshot, analyzer_registry
from services.analyzer.settings import AnalyzerSettings
from services.common.dependencies import kafka_problems
from services.common.probes import ProbeServer

logger = logging.getLogger(__name__)

SNAPSHOT_TIMEOUT_S = 5.0


def analyzer_problems(app: faust.App) -> list[str]:
    """Readiness of the faust worker: running, in its group, tables recovered.

    Reads state faust keeps on the event loop; `recovery.completed` is set once the
    first assignment's tables are rebuilt from their changelogs (and stays set),
    `in_recovery` and `rebalancing` cover every later rebalance.
    """
    if app.state != "running":
        return [f"the faust worker is {app.state}"]
    # faust's TableManager has `recovery`; its protocol type does not declare it.
    recovery = app.tables.recovery  # type: ignore[attr-defined]
    if not recovery.completed.is_set():
        return ["tables not recovered yet (joining the group or reading changelogs)"]
    if app.in_recovery:
        return ["tables recovering after a rebalance"]
    if app.rebalancing:
        return ["the consumer group is rebalancing"]
    return []


def worker_crashed(app: faust.App) -> list[str]:
    """Liveness: a crashed faust worker (read from the probe server's thread)."""
    return ["the faust worker crashed"] if app.state == "crashed" else []


class Sidecar(Service):
    """What runs beside the faust app: metrics and probes, the routing watcher."""

    def __init__(self, analyzer: Analyzer, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._analyzer = analyzer
        self._stop = asyncio.Event()
        self._watch_task: asyncio.Task[None] | None = None
        self._probes: ProbeServer | None = None
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

        app, kafka = self._analyzer.app, settings.kafka

        async def faust_problems() -> list[str]:
            return analyzer_problems(app)

        async def broker_problems() -> list[str]:
            return await kafka_problems(kafka, client_id=f"{settings.app_id}-probe")

        self._probes = ProbeServer(
            settings.metrics_host,
            settings.metrics_port,
            registry=analyzer_registry(read_snapshot),
            live_checks={"faust": lambda: worker_crashed(app)},
            ready_checks={"faust": faust_problems, "kafka": broker_problems},
        )
        self._probes.start()
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
        if self._probes is not None:
            await asyncio.to_thread(self._probes.stop)


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
