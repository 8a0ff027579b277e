"""The trainer process: registry, control plane, scheduler, approvals, one lifecycle."""

from __future__ import annotations

import asyncio
import logging

from grpc import aio

from services.common.dependencies import PostgresLink
from services.common.probes import ProbeServer
from services.trainer.pipeline import Pipeline
from services.trainer.rollout import RolloutController
from services.trainer.server import (
    TableBroadcast,
    follow_database_loop,
    start_control_server,
)
from services.trainer.settings import TrainerSettings
from services.trainer.store import Registry

logger = logging.getLogger(__name__)


class App:
    """Wires the pool, the controller, the gRPC server and the scheduler."""

    def __init__(self, settings: TrainerSettings) -> None:
        self.settings = settings
        self.postgres = PostgresLink(settings.postgres)
        self.broadcast = TableBroadcast()
        self.control_server: aio.Server | None = None
        # Liveness is the event loop answering (the probe server's own check): the
        # loops below run in one task group, and any of them failing ends the process.
        self.probes = ProbeServer(
            settings.metrics_host,
            settings.metrics_port,
            ready_checks={
                "postgres": self.postgres.problems,
                "control_plane": self._control_problems,
            },
        )

    async def run(self, stop: asyncio.Event) -> None:
        settings = self.settings
        logger.info(
            "trainer starting route=%s grpc=%s:%d steps=%s min_new_rated=%d"
            " cron=%r backend=%s policy=%s route_policies=%s schema=%s",
            settings.route,
            settings.grpc_host,
            settings.grpc_port,
            settings.rollout_steps,
            settings.min_new_rated,
            settings.cron,
            settings.backend,
            settings.policy,
            settings.route_policies,
            settings.postgres.db_schema,
        )

        # /metrics, /livez and /readyz first: they answer (unready) during start-up.
        if settings.metrics_port:
            self.probes.start()
        try:
            await self._run(stop)
        finally:
            self.probes.stop()

    async def _run(self, stop: asyncio.Event) -> None:
        settings = self.settings

        # Start dependencies: the schema and the pool (waited for), the registry.
        pool = await self.postgres.connect(stop, migrate=True)
        if pool is None:
            logger.info("trainer stopped before PostgreSQL answered")
            return
        registry = Registry(pool)
        broadcast = self.broadcast
        controller = RolloutController(
            registry,
            schema=settings.postgres.db_schema,
            on_table=broadcast.publish,
            steps=settings.rollout_steps,
            policy_for=settings.policy_for,
        )
        try:
            await controller.ensure_bootstrap(
                settings.route,
                base_model=settings.base_model,
                upstream_url=settings.inference_base_url,
            )
            await broadcast.publish(await registry.routing_table())
            await self._serve(stop, registry, controller)
        finally:
            await self.postgres.close()
            logger.info("trainer stopped")

    async def _serve(
        self, stop: asyncio.Event, registry: Registry, controller: RolloutController
    ) -> None:
        settings = self.settings

        # Serve the control plane, follow the database, run the scheduler.
        server = await start_control_server(
            settings.control,
            host=settings.grpc_host,
            port=settings.grpc_port,
            broadcast=self.broadcast,
            controller=controller,
        )
        self.control_server = server
        pipeline = Pipeline(settings, registry, controller)
        try:
            async with asyncio.TaskGroup() as tasks:
                loops = [
                    tasks.create_task(
                        follow_database_loop(registry, self.broadcast, stop)
                    ),
                    tasks.create_task(pipeline.schedule_loop(stop)),
                    tasks.create_task(
                        controller.approvals_loop(stop, settings.approvals_interval_s)
                    ),
                ]
                # On stop, end the loops at once, a training run or staging in
                # progress included: its fine-tuning child is killed, and the run,
                # not marked finished, is tried again on the same window later.
                await stop.wait()
                for loop in loops:
                    loop.cancel()
        finally:
            # Stop intake first (no new calls); the caller closes the pool.
            self.control_server = None
            await server.stop(grace=2.0)

    async def _control_problems(self) -> list[str]:
        """Readiness: the gRPC server is serving a routing table."""
        problems = []
        if self.control_server is None:
            problems.append("the gRPC control server is not serving")
        if self.broadcast.table.version == 0:
            problems.append("no routing table published yet")
        return problems
