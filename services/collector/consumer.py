"""The intake: read a batch, validate, store, dead-letter, then commit its offsets.

Order matters for at-least-once reading with exactly-once effects: rows are
committed in PostgreSQL and dead letters acknowledged by Kafka before the batch's
offsets are committed. A crash anywhere before that replays the batch, and the
event_id key turns the replay into counted duplicates.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

from aiokafka import (
    AIOKafkaConsumer,
    ConsumerRebalanceListener,
    ConsumerRecord,
    TopicPartition,
)
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from services.collector import metrics
from services.collector.errors import CollectorError, CommitUnavailableError
from services.collector.handlers import (
    EventKind,
    Rejection,
    RejectReason,
    build_dead_letter,
    record_row,
)
from services.collector.ordering import WriteTurn
from services.collector.publisher import DeadLetterPublisher
from services.collector.settings import CollectorSettings
from services.collector.store import EventStore, RowRefusedError, Source
from services.common.kafka import Topics
from services.common.probes import Heartbeat

logger = logging.getLogger(__name__)

Record: TypeAlias = ConsumerRecord[bytes, bytes]
Batch: TypeAlias = dict[TopicPartition, list[Record]]
Row: TypeAlias = tuple[Any, ...]
T = TypeVar("T")
# Records validated between two turns of the event loop (well under a millisecond):
# the batch being stored waits at most that long for each of its round trips.
PREPARE_CHUNK = 50
# Batches between validation and their committed offsets: one committing, the next
# writing its rows (services/collector/ordering.py), a third waiting for its turn,
# while the consume loop validates a fourth.
MAX_BATCHES_IN_STORE = 3


class BatchAbandonedError(Exception):
    """Stop was requested while a batch waited on a dependency; it is not committed."""


@dataclass(frozen=True)
class Sorted:
    """A batch split into events to store and records to dead-letter."""

    # Each event's table row, built here, off the store's critical path; the
    # validated model itself is dropped at once (less for the GC to track).
    accepted: list[tuple[Record, EventKind, Row]]
    rejected: list[tuple[Record, Rejection]]


@dataclass(frozen=True)
class Prepared:
    """A fetched batch after validation, ready to be stored and committed."""

    batch: Batch
    size: int
    sorted_batch: Sorted
    started: float


class GroupMembership(ConsumerRebalanceListener):  # type: ignore[misc]  # untyped
    """Whether the consumer is a member of its group now, for readiness.

    aiokafka calls `on_partitions_assigned` after every completed join, also with an
    empty assignment (more members than partitions), and `on_partitions_revoked`
    before every rejoin: in between, the member is in the group.
    """

    def __init__(self) -> None:
        self.joined = False
        self.assigned: frozenset[TopicPartition] = frozenset()

    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self.joined = False

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.joined = True
        self.assigned = frozenset(assigned)


class EventConsumer:
    """Consumes interactions and feedback in batches until the stop event is set."""

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        store: EventStore,
        publisher: DeadLetterPublisher,
        settings: CollectorSettings,
        *,
        heartbeat: Heartbeat | None = None,
    ) -> None:
        topics = Topics(settings.kafka.topic_prefix)
        self._kinds = {
            topics.interactions: EventKind.INTERACTION,
            topics.feedback: EventKind.FEEDBACK,
        }
        self._topic_of = {kind: topic for topic, kind in self._kinds.items()}
        self._consumer = consumer
        self._store = store
        self._publisher = publisher
        self._settings = settings
        # Built once from the settings: one AESGCM object per key, none per row.
        self._keyring = settings.encryption.keyring
        self._assignment: frozenset[TopicPartition] = frozenset()
        # Beaten on every poll and every retry: /livez fails when neither happens.
        self.heartbeat = heartbeat or Heartbeat(
            "consume loop", settings.liveness_timeout_s
        )
        self.totals: Counter[str] = Counter()

    async def consume_loop(self, stop: asyncio.Event) -> None:
        """Process batches until `stop` is set; the batches in hand are finished first.

        Batches overlap: the newest is fetched and validated (CPU, here) while the
        one before it writes its rows and the one before that commits. Keys are
        still claimed and rows committed in Kafka order (a WriteTurn per batch),
        and offsets move in order and only past stored rows, as if one batch
        were processed at a time.
        """
        in_flight: deque[tuple[asyncio.Task[None], WriteTurn]] = deque()
        try:
            while not stop.is_set():
                self.heartbeat.beat()
                batch = await self._consumer.getmany(
                    timeout_ms=self._settings.batch_timeout_ms,
                    max_records=self._settings.max_batch_size,
                )
                self._maybe_log_assignment()
                if batch:
                    prepared = await self._prepare_interleaved(batch)
                    while len(in_flight) >= MAX_BATCHES_IN_STORE:
                        await in_flight.popleft()[0]
                    previous, before = in_flight[-1] if in_flight else (None, None)
                    turn = WriteTurn(before)
                    task = asyncio.create_task(
                        self.finish_batch(prepared, stop, previous, turn)
                    )
                    in_flight.append((task, turn))
                    # One turn for the new task to send its first statement before
                    # the next fetch and validation take the loop.
                    await asyncio.sleep(0)
                else:
                    while in_flight:
                        await in_flight.popleft()[0]
                await self._update_lag()
            while in_flight:
                await in_flight.popleft()[0]
        except BatchAbandonedError:
            logger.warning("batch abandoned uncommitted at stop; it will replay")
        finally:
            # Cancelled from outside (a crash, in effect), or a batch failed: nothing
            # more is committed, and the uncommitted batches replay on restart.
            for task, _ in in_flight:
                task.cancel()
            # Their outcome is not this loop's any more: it ends with its own.
            tasks = [task for task, _ in in_flight]
            await asyncio.gather(*tasks, return_exceptions=True)

    async def process_batch(self, batch: Batch, stop: asyncio.Event) -> None:
        """Validate, store, dead-letter and commit one batch, in that order."""
        await self.finish_batch(self.prepare_batch(batch), stop)

    def prepare_batch(self, batch: Batch) -> Prepared:
        """The pure part of a batch: count it and sort its records (no I/O)."""
        records = self._count(batch)
        return Prepared(batch, len(records), self._sort(records), time.monotonic())

    async def _prepare_interleaved(self, batch: Batch) -> Prepared:
        """`prepare_batch`, giving the event loop a turn every PREPARE_CHUNK records.

        The batch being stored meanwhile needs a turn for each of its round trips
        to PostgreSQL; without these it would wait for the whole validation.
        """
        records = self._count(batch)
        accepted: list[tuple[Record, EventKind, Row]] = []
        rejected: list[tuple[Record, Rejection]] = []
        for start in range(0, len(records), PREPARE_CHUNK):
            if start:
                await asyncio.sleep(0)
            part = self._sort(records[start : start + PREPARE_CHUNK])
            accepted += part.accepted
            rejected += part.rejected
        return Prepared(
            batch, len(records), Sorted(accepted, rejected), time.monotonic()
        )

    def _count(self, batch: Batch) -> list[Record]:
        for tp, partition in batch.items():
            metrics.EVENTS_CONSUMED.labels(tp.topic).inc(len(partition))
        return [record for partition in batch.values() for record in partition]

    async def finish_batch(
        self,
        prepared: Prepared,
        stop: asyncio.Event,
        previous: asyncio.Task[None] | None = None,
        turn: WriteTurn | None = None,
    ) -> None:
        """Store, dead-letter and commit a prepared batch, in that order.

        With `previous` (the batch before, still in hand) and its place in the
        write order `turn`, the rows are written in that order and the offsets
        committed only after `previous` finished.
        """
        sorted_batch = prepared.sorted_batch
        turn = turn or WriteTurn()
        try:
            # 1. Store the events; rows PostgreSQL itself refuses join the rejections.
            refused = await self._retry(
                lambda: self._store_events(sorted_batch.accepted, turn), stop
            )
        finally:
            # Uncommitted (a failure, stop or cancellation): the batch after it
            # must not commit either. Nothing when the rows are committed.
            turn.abandon()

        # 2. Dead letters acknowledged before the offsets move past them.
        rejected = sorted_batch.rejected + refused
        await self._retry(lambda: self._publish_dead_letters(rejected), stop)

        # 3. Commit the next offset of every partition in the batch, after the
        # batch before committed its own. Its failure (or stop) ends this batch
        # too; shielded: this batch being cancelled must not cancel that one.
        if previous is not None:
            await asyncio.shield(previous)
        await self._retry(lambda: self._commit(prepared.batch), stop)
        self.totals.update(batches=1, consumed=prepared.size)
        metrics.BATCH_SIZE.observe(prepared.size)
        metrics.BATCH_SECONDS.observe(time.monotonic() - prepared.started)

    def _sort(self, records: Sequence[Record]) -> Sorted:
        accepted: list[tuple[Record, EventKind, Row]] = []
        rejected: list[tuple[Record, Rejection]] = []
        # Locals: this loop runs once per record.
        kinds, keyring = self._kinds, self._keyring
        max_payload_bytes = self._settings.max_payload_bytes
        for record in records:
            kind = kinds[record.topic]
            outcome = record_row(
                kind, record.value, max_payload_bytes=max_payload_bytes, keyring=keyring
            )
            if isinstance(outcome, Rejection):
                rejected.append((record, outcome))
            else:
                accepted.append((record, kind, outcome))
        return Sorted(accepted, rejected)

    async def _store_events(
        self, accepted: list[tuple[Record, EventKind, Row]], turn: WriteTurn
    ) -> list[tuple[Record, Rejection]]:
        """Store the batch's events; the records to dead-letter instead.

        Those are the repeats of events stored from other records (a producer's
        retry), and on the rare path below, rows PostgreSQL refuses.
        """
        try:
            return await self._insert(accepted, turn)
        except RowRefusedError as error:
            logger.warning("batch refused by PostgreSQL, storing one by one: %s", error)

        # NOTE: one transaction per event only on this rare path, to find the rows
        # PostgreSQL refuses; the others are stored and the refused dead-lettered.
        # They start after the batch before committed and count as this batch's
        # claim when all are done.
        await turn.may_claim()
        await turn.may_commit()
        rejected: list[tuple[Record, Rejection]] = []
        for item in accepted:
            try:
                rejected += await self._insert([item])
            except RowRefusedError as error:
                rejection = Rejection(RejectReason.STORAGE_REJECTED, str(error))
                rejected.append((item[0], rejection))
        turn.claimed()
        turn.committed()
        return rejected

    async def _insert(
        self,
        items: Sequence[tuple[Record, EventKind, Row]],
        turn: WriteTurn | None = None,
    ) -> list[tuple[Record, Rejection]]:
        interactions: list[Row] = []
        feedback: list[Row] = []
        records: list[Record] = []
        sources: tuple[list[Source], list[Source]] = ([], [])
        for record, kind, row in items:
            is_interaction = kind is EventKind.INTERACTION
            (interactions if is_interaction else feedback).append(row)
            sources[0 if is_interaction else 1].append(
                (record.topic, record.partition, record.offset)
            )
            records.append(record)
        stored = await self._store.insert_batch(interactions, feedback, turn, sources)
        for kind, seen, new in (
            (EventKind.INTERACTION, len(interactions), stored.interactions),
            (EventKind.FEEDBACK, len(feedback), stored.feedback),
        ):
            topic = self._topic_of[kind]
            metrics.EVENTS_STORED.labels(topic).inc(new)
            metrics.EVENTS_DUPLICATE.labels(topic).inc(seen - new)
            self.totals.update(stored=new, duplicates=seen - new)
        if not stored.repeats:
            return []
        by_source = {
            (record.topic, record.partition, record.offset): record
            for record in records
        }
        return [
            (by_source[repeat.source], Rejection(RejectReason.DUPLICATE, repeat.detail))
            for repeat in stored.repeats
        ]

    async def _publish_dead_letters(
        self, rejected: Sequence[tuple[Record, Rejection]]
    ) -> None:
        letters = [
            (
                record.key,
                build_dead_letter(
                    rejection,
                    topic=record.topic,
                    partition=record.partition,
                    offset=record.offset,
                    key=record.key,
                    value=record.value,
                    consumer=self._settings.group_id,
                    max_value_bytes=self._settings.dead_letter_max_value_bytes,
                ),
            )
            for record, rejection in rejected
        ]
        await self._publisher.publish(letters)
        for record, rejection in rejected:
            # A repeat of a stored event harms nothing (it is not stored twice).
            log = (
                logger.info
                if rejection.reason is RejectReason.DUPLICATE
                else logger.error
            )
            log(
                "record dead-lettered topic=%s partition=%d offset=%d reason=%s "
                "bytes=%d detail=%s",
                record.topic,
                record.partition,
                record.offset,
                rejection.reason,
                len(record.value or b""),
                rejection.detail,
            )
            metrics.EVENTS_DEADLETTERED.labels(record.topic, rejection.reason).inc()
        self.totals.update(deadlettered=len(rejected))

    async def _commit(self, batch: Batch) -> None:
        offsets = {tp: records[-1].offset + 1 for tp, records in batch.items()}
        try:
            async with asyncio.timeout(self._settings.kafka_timeout_s):
                await self._consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as error:
            # The partitions moved to another member meanwhile: it replays from the
            # last commit and the event_id key makes that harmless.
            logger.warning("commit refused after a rebalance, will replay: %r", error)
        except (KafkaError, TimeoutError) as error:
            raise CommitUnavailableError(f"commit failed: {error!r}") from error

    async def _retry(
        self, operation: Callable[[], Awaitable[T]], stop: asyncio.Event
    ) -> T:
        """Run `operation`, retrying retriable errors with backoff until stop is set."""
        delay_s = self._settings.store_retry_min_s
        while True:
            self.heartbeat.beat()
            try:
                return await operation()
            except CollectorError as error:
                if not error.retriable:
                    raise
                metrics.STORE_RETRIES.inc()
                logger.warning("retrying in %.1f s, not committing: %s", delay_s, error)
            if await wait_or_stop(stop, delay_s):
                raise BatchAbandonedError
            delay_s = min(delay_s * 2, self._settings.store_retry_max_s)

    def _maybe_log_assignment(self) -> None:
        assignment = frozenset(self._consumer.assignment())
        if assignment != self._assignment:
            self._assignment = assignment
            logger.info(
                "partitions assigned group=%s partitions=%s",
                self._settings.group_id,
                sorted(f"{tp.topic}/{tp.partition}" for tp in assignment),
            )

    async def _update_lag(self) -> None:
        lag: Counter[str] = Counter({topic: 0 for topic in self._kinds})
        try:
            # The live assignment, not the one last logged: a rebalance may have
            # revoked partitions since, and aiokafka refuses to answer for those.
            for tp in self._consumer.assignment():
                self.heartbeat.beat()
                highwater = self._consumer.highwater(tp)
                if highwater is None:
                    continue
                async with asyncio.timeout(self._settings.kafka_timeout_s):
                    position = await self._consumer.position(tp)
                lag[tp.topic] += max(highwater - position, 0)
        except (KafkaError, TimeoutError, IllegalStateError, AssertionError) as error:
            # AssertionError: aiokafka's check that the partition is still assigned,
            # when a rebalance revokes it while we await its position.
            logger.debug("consumer lag not updated: %r", error)
            return
        for topic, value in lag.items():
            metrics.CONSUMER_LAG.labels(topic).set(value)


async def wait_or_stop(stop: asyncio.Event, delay_s: float) -> bool:
    """Sleep `delay_s` or until stop is set; True when stop is set."""
    try:
        async with asyncio.timeout(delay_s):
            await stop.wait()
    except TimeoutError:
        return False
    return True
