"""Wires the collector's clients together and owns their lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable

from services.collector import metrics
from services.collector.consumer import EventConsumer, wait_or_stop
from services.collector.errors import CollectorError
from services.collector.publisher import DeadLetterPublisher
from services.collector.settings import CollectorSettings
from services.collector.store import EventStore
from services.common import db
from services.common.kafka import Topics, make_consumer, make_producer

logger = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 15.0


class App:
    """The collector process: Kafka in, PostgreSQL and dead letters out."""

    def __init__(self, settings: CollectorSettings) -> None:
        self.settings = settings
        self.stopping = asyncio.Event()
        self.intake: EventConsumer | None = None

    def stop(self) -> None:
        """Ask the app to finish the batch in hand, commit it and close. Idempotent."""
        self.stopping.set()

    async def run(self) -> None:
        """Run until `stop()` (or a signal) sets the stop event, or a task fails."""
        settings = self.settings
        logger.info("collector starting settings=%s", settings.model_dump(mode="json"))

        # Schema first: nothing is consumed before the tables exist.
        if settings.migrate_on_start:
            await db.migrate(settings.postgres)

        async with contextlib.AsyncExitStack() as stack:
            # Dependencies; the exit stack closes them in reverse (consumer first).
            intake, store = await self._start_clients(stack)
            self.intake = intake

            # Run the intake and its periodic siblings until stop or a failure.
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._intake_task(intake))
                tasks.create_task(self._orphan_loop(store))
                tasks.create_task(self._partition_loop(store))
                tasks.create_task(self._report_loop(intake))

        logger.info("collector stopped %s", describe_totals(intake.totals))

    async def _start_clients(
        self, stack: contextlib.AsyncExitStack
    ) -> tuple[EventConsumer, EventStore]:
        settings = self.settings
        topics = Topics(settings.kafka.topic_prefix)

        # /metrics first, so it answers while the consumer joins its group.
        server = metrics.MetricsServer(settings.metrics_host, settings.metrics_port)
        server.start()
        stack.callback(server.stop)

        pool = await db.create_pool(settings.postgres)
        stack.push_async_callback(_close_within, pool.close, "pool")

        producer = make_producer(settings.kafka, client_id=settings.client_id)
        await producer.start()
        stack.push_async_callback(_close_within, producer.stop, "producer")

        consumer = make_consumer(
            settings.kafka,
            topics.interactions,
            topics.feedback,
            group_id=settings.group_id,
            client_id=settings.client_id,
        )
        await consumer.start()
        stack.push_async_callback(_close_within, consumer.stop, "consumer")

        publisher = DeadLetterPublisher(
            producer, topics.deadletter, timeout_s=settings.kafka_timeout_s
        )
        store = EventStore(pool)
        return EventConsumer(consumer, store, publisher, settings), store

    async def _intake_task(self, intake: EventConsumer) -> None:
        # The intake ending (stop, or an abandoned batch) ends the periodic loops too.
        try:
            await intake.consume_loop(self.stopping)
        finally:
            self.stopping.set()

    async def _orphan_loop(self, store: EventStore) -> None:
        while not self.stopping.is_set():
            try:
                count = await store.count_orphan_feedback(self.settings.orphan_window_s)
                metrics.ORPHAN_FEEDBACK.set(count)
            except CollectorError as error:
                logger.warning("orphan feedback not counted: %s", error)
            await wait_or_stop(self.stopping, self.settings.orphan_refresh_s)

    async def _partition_loop(self, store: EventStore) -> None:
        settings = self.settings
        while not self.stopping.is_set():
            try:
                created = await store.ensure_partitions(settings.partition_days_ahead)
                dropped = 0
                if settings.retention_days > 0:
                    dropped = await store.drop_expired(settings.retention_days)
                if created or dropped:
                    logger.info(
                        "event partitions created=%d dropped=%d retention_days=%d",
                        created,
                        dropped,
                        settings.retention_days,
                    )
            except CollectorError as error:
                logger.warning("event partitions not maintained: %s", error)
            await wait_or_stop(self.stopping, settings.partition_refresh_s)

    async def _report_loop(self, intake: EventConsumer) -> None:
        while not await wait_or_stop(self.stopping, self.settings.report_interval_s):
            logger.info("collector progress %s", describe_totals(intake.totals))


def describe_totals(totals: Counter[str]) -> str:
    """The counters of the periodic and final INFO lines, as key=value pairs."""
    names = ("batches", "consumed", "stored", "duplicates", "deadlettered")
    return " ".join(f"{name}={totals[name]}" for name in names)


async def _close_within(close: Callable[[], Awaitable[object]], name: str) -> None:
    """Await `close()`, giving up (with a WARNING) after CLOSE_TIMEOUT_S."""
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT_S):
            await close()
        logger.debug("%s closed", name)
    except TimeoutError:
        logger.warning("%s did not close within %.0f s", name, CLOSE_TIMEOUT_S)
