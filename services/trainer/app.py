"""The trainer process: registry, control plane, scheduler, approvals, one lifecycle."""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import start_http_server

from services.common import db
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

        # Start dependencies: the schema, the pool, the registry.
        await db.migrate(settings.postgres)
        pool = await db.create_pool(settings.postgres)
        registry = Registry(pool)
        broadcast = TableBroadcast()
        controller = RolloutController(
            registry,
            schema=settings.postgres.db_schema,
            on_table=broadcast.publish,
            steps=settings.rollout_steps,
            policy_for=settings.policy_for,
        )
        await controller.ensure_bootstrap(
            settings.route,
            base_model=settings.base_model,
            upstream_url=settings.inference_base_url,
        )
        await broadcast.publish(await registry.routing_table())
        if settings.metrics_port:
            start_http_server(settings.metrics_port, addr=settings.metrics_host)

        # Serve the control plane, follow the database, run the scheduler.
        server = await start_control_server(
            settings.control,
            host=settings.grpc_host,
            port=settings.grpc_port,
            broadcast=broadcast,
            controller=controller,
        )
        pipeline = Pipeline(settings, registry, controller)
        try:
            async with asyncio.TaskGroup() as tasks:
                loops = [
                    tasks.create_task(follow_database_loop(registry, broadcast, stop)),
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
            # Stop intake first (no new calls), then close the pool.
            await server.stop(grace=2.0)
            await pool.close()
            logger.info("trainer stopped")
