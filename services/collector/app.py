"""Wires the collector's clients together and owns their lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable

import asyncpg

from services.collector import metrics
from services.collector.consumer import EventConsumer, GroupMembership, wait_or_stop
from services.collector.errors import CollectorError
from services.collector.publisher import DeadLetterPublisher
from services.collector.settings import CollectorSettings
from services.collector.store import EventStore
from services.common import lifecycle
from services.common.dependencies import PostgresLink
from services.common.kafka import Topics, make_consumer, make_producer
from services.common.probes import Heartbeat, ProbeServer

logger = logging.getLogger(__name__)

# Net container allocations between two young garbage collections (CPython: 700).
YOUNG_GC_THRESHOLD = 20_000

CLOSE_TIMEOUT_S = 15.0


class App:
    """The collector process: Kafka in, PostgreSQL and dead letters out."""

    def __init__(self, settings: CollectorSettings) -> None:
        self.settings = settings
        self.stopping = asyncio.Event()
        self.intake: EventConsumer | None = None
        # Rows carry jsonb as the JSON text the row builders made (store.py COPYs).
        # Its code sets no session state: released connections need no reset.
        self.postgres = PostgresLink(
            settings.postgres, jsonb_as="text", reset_sessions=False
        )
        self.membership = GroupMembership()
        self.heartbeat = Heartbeat("consume loop", settings.liveness_timeout_s)
        self.probes = ProbeServer(
            settings.metrics_host,
            settings.metrics_port,
            live_checks={"collector": self.heartbeat.problems},
            ready_checks={
                "kafka": self._kafka_problems,
                "postgres": self.postgres.problems,
            },
        )

    def stop(self) -> None:
        """Ask the app to finish the batch in hand, commit it and close. Idempotent."""
        self.stopping.set()

    async def run(self) -> None:
        """Run until `stop()` (or a signal) sets the stop event, or a task fails."""
        settings = self.settings
        logger.info("collector starting settings=%s", settings.model_dump(mode="json"))

        async with contextlib.AsyncExitStack() as stack:
            # /metrics, /livez and /readyz first: they answer (unready) during start-up.
            if settings.metrics_port:
                self.probes.start()
                stack.callback(self.probes.stop)

            # PostgreSQL, waited for; the schema before anything is consumed.
            pool = await self.postgres.connect(
                self.stopping,
                migrate=settings.migrate_on_start,
                on_attempt=self.heartbeat.beat,
            )
            if pool is None:
                logger.info("collector stopped before PostgreSQL answered")
                return
            stack.push_async_callback(_close_within, self.postgres.close, "pool")

            # Kafka clients; the exit stack closes them in reverse (consumer first).
            intake, store = await self._start_clients(stack, pool)
            self.intake = intake
            # A batch allocates some hundred thousand objects, nearly all freed by
            # reference counting (its records, events and rows); at CPython's
            # default a young collection would scan the live ones 150 times a batch.
            lifecycle.settle_heap(young_threshold=YOUNG_GC_THRESHOLD)

            # Run the intake and its periodic siblings until stop or a failure.
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._intake_task(intake))
                tasks.create_task(self._orphan_loop(store))
                tasks.create_task(self._partition_loop(store))
                tasks.create_task(self._report_loop(intake))

        logger.info("collector stopped %s", describe_totals(intake.totals))

    async def _start_clients(
        self, stack: contextlib.AsyncExitStack, pool: asyncpg.Pool
    ) -> tuple[EventConsumer, EventStore]:
        settings = self.settings
        topics = Topics(settings.kafka.topic_prefix)

        # Room for the largest dead letter: its value in base64, and the rest.
        letter_bytes = settings.dead_letter_max_value_bytes * 4 // 3 + 128 * 1024
        producer = make_producer(
            settings.kafka,
            client_id=settings.client_id,
            max_request_size=max(1024 * 1024, letter_bytes),
        )
        await producer.start()
        stack.push_async_callback(_close_within, producer.stop, "producer")

        consumer = make_consumer(
            settings.kafka, group_id=settings.group_id, client_id=settings.client_id
        )
        # The listener tells readiness whether the consumer is in its group.
        consumer.subscribe(
            topics=[topics.interactions, topics.feedback], listener=self.membership
        )
        await consumer.start()
        stack.push_async_callback(_close_within, consumer.stop, "consumer")

        publisher = DeadLetterPublisher(
            producer, topics.deadletter, timeout_s=settings.kafka_timeout_s
        )
        store = EventStore(pool)
        intake = EventConsumer(
            consumer, store, publisher, settings, heartbeat=self.heartbeat
        )
        return intake, store

    async def _kafka_problems(self) -> list[str]:
        """Readiness: the consumer is in its group (with or without partitions)."""
        if self.membership.joined:
            return []
        return [f"the consumer has not joined group {self.settings.group_id!r} yet"]

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
