"""Publishing events to Kafka without ever making a client wait for the broker."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from services.common.events import EventModel, encode
from services.gateway.errors import PublisherStartError
from services.gateway.metrics import (
    EVENTS_DROPPED,
    EVENTS_PUBLISHED,
    EVENTS_REPLAYED,
    EVENTS_SPOOLED,
    PUBLISH_QUEUE_DEPTH,
    SPOOL_BYTES,
)
from services.gateway.spool import Spool, SpooledEvent

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Outgoing:
    topic: str
    key: bytes
    event: EventModel


class EventPublisher:
    """A bounded in-memory queue in front of an aiokafka producer, and a spool.

    `publish` only enqueues; `publish_loop` sends batches in the background. With a
    spool, what the broker refuses (and what overflows the queue) is appended to it
    and from then on every event goes through the spool, which `replay_loop` sends
    in order once the broker takes it again. Without a spool, or when the spool is
    full, the event is dropped, counted and logged.
    """

    def __init__(
        self,
        producer: AIOKafkaProducer,
        *,
        queue_size: int,
        batch_size: int,
        spool: Spool | None = None,
        fsync_interval_s: float = 0.2,
    ) -> None:
        self._producer = producer
        self._queue: asyncio.Queue[_Outgoing] = asyncio.Queue(maxsize=queue_size)
        self._batch_size = batch_size
        self._spool = spool
        self._fsync_interval_s = fsync_interval_s
        self.started = False
        # Why the last batch failed, cleared by the next one that succeeds.
        self.last_error: str | None = None
        self.published_count = 0
        self.dropped_count = 0
        self.spooled_count = 0
        PUBLISH_QUEUE_DEPTH.set_function(self._queue.qsize)
        if spool is not None:
            SPOOL_BYTES.set_function(lambda: spool.size_bytes)

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    def publish(self, topic: str, key: str, event: EventModel) -> bool:
        """Enqueue `event` for `topic` keyed by `key`; False when it was dropped."""
        try:
            self._queue.put_nowait(_Outgoing(topic, key.encode(), event))
        except asyncio.QueueFull:
            if self._spool is not None:
                return self._to_spool([_Outgoing(topic, key.encode(), event)]) == 1
            EVENTS_DROPPED.labels(topic=topic, reason="queue_full").inc()
            self.dropped_count += 1
            logger.warning(
                "publish queue full, event dropped topic=%s key=%s depth=%d",
                topic,
                key,
                self._queue.qsize(),
            )
            return False
        return True

    async def start(self, timeout_s: float, *, bootstrap_servers: str) -> None:
        """Connect the producer to the broker; PublisherStartError when it cannot."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._producer.start()
        except (KafkaError, OSError, TimeoutError) as error:
            await self._producer.stop()
            raise PublisherStartError(
                f"Kafka at {bootstrap_servers} did not accept the producer within "
                f"{timeout_s:.0f} s ({error!r}); check "
                "FLYWHEEL_KAFKA__BOOTSTRAP_SERVERS, FLYWHEEL_GATEWAY_STARTUP_TIMEOUT_S"
            ) from error
        self.started = True

    async def publish_loop(self) -> None:
        """Send queued events in batches until cancelled."""
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._batch_size and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                if self._spool is not None and not self._spool.empty:
                    # Older events wait in the spool: keep the order, queue behind them.
                    self._to_spool(batch)
                else:
                    await self._send_batch(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    def _to_spool(self, batch: list[_Outgoing]) -> int:
        """Append `batch` to the spool; what does not fit is dropped (counted)."""
        assert self._spool is not None
        was_empty = self._spool.empty
        events = [SpooledEvent(i.topic, i.key, encode(i.event)) for i in batch]
        appended = self._spool.append(events)
        for item in batch[:appended]:
            EVENTS_SPOOLED.labels(topic=item.topic).inc()
        for item in batch[appended:]:
            EVENTS_DROPPED.labels(topic=item.topic, reason="spool_full").inc()
        self.spooled_count += appended
        self.dropped_count += len(batch) - appended
        if was_empty and appended:
            logger.warning("broker unavailable, spooling events to disk")
        if appended < len(batch):
            logger.error(
                "spool full, events dropped count=%d spool_bytes=%d; raise "
                "FLYWHEEL_GATEWAY_SPOOL_MAX_BYTES or bring the broker back",
                len(batch) - appended,
                self._spool.size_bytes,
            )
        return appended

    async def replay_loop(self) -> None:
        """Send spooled events, in order, whenever the broker takes them again."""
        assert self._spool is not None
        backoff_s = 0.2
        while True:
            if self._spool.empty:
                await asyncio.sleep(0.1)
                continue
            events, cursor = self._spool.read(self._batch_size)
            failures = await self._send_raw(events)
            if failures:
                await asyncio.sleep(backoff_s)
                backoff_s = min(5.0, backoff_s * 2)
                continue
            backoff_s = 0.2
            self._spool.commit(cursor)
            for event in events:
                EVENTS_REPLAYED.labels(topic=event.topic).inc()
                EVENTS_PUBLISHED.labels(topic=event.topic).inc()
            self.published_count += len(events)
            if self._spool.empty:
                logger.info("spool drained, publishing directly again")

    async def sync_loop(self) -> None:
        """fsync the spool in batches (every `fsync_interval_s`); until cancelled."""
        assert self._spool is not None
        while True:
            await asyncio.sleep(self._fsync_interval_s)
            await asyncio.to_thread(self._spool.sync)

    async def _send_raw(self, events: list[SpooledEvent]) -> int:
        """Send already-encoded events; the number that failed."""
        futures = []
        for event in events:
            try:
                futures.append(
                    await self._producer.send(event.topic, event.value, key=event.key)
                )
            except Exception as error:  # noqa: BLE001 - a failed send is retried
                self.last_error = f"{type(error).__name__}: {error}"
                return len(events)
        results = await asyncio.gather(*futures, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            self.last_error = f"{type(failed[0]).__name__}: {failed[0]}"
        return len(failed)

    async def _send_batch(self, batch: list[_Outgoing]) -> None:
        # send() only appends to the producer's buffer; the acks come back through the
        # futures, so a whole batch is in flight at once.
        futures: list[asyncio.Future[object]] = []
        for item in batch:
            future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
            try:
                sent = await self._producer.send(
                    item.topic, encode(item.event), key=item.key
                )
            except Exception as error:  # noqa: BLE001 - counted as a drop below
                future.set_exception(error)
            else:
                future = sent
            futures.append(future)
        results = await asyncio.gather(*futures, return_exceptions=True)
        published: Counter[str] = Counter()
        refused: list[_Outgoing] = []
        for item, result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                refused.append(item)
                self.last_error = f"{type(result).__name__}: {result}"
            else:
                published[item.topic] += 1
        if refused and self._spool is not None:
            self._to_spool(refused)
            for topic, count in published.items():
                EVENTS_PUBLISHED.labels(topic=topic).inc(count)
            self.published_count += len(batch) - len(refused)
            return
        for item in refused:
            EVENTS_DROPPED.labels(topic=item.topic, reason="send_failed").inc()
        for topic, count in published.items():
            EVENTS_PUBLISHED.labels(topic=topic).inc(count)
        failed = len(batch) - sum(published.values())
        self.published_count += len(batch) - failed
        self.dropped_count += failed
        if failed:
            logger.warning(
                "broker refused events, dropped count=%d error=%s",
                failed,
                self.last_error,
            )
        else:
            self.last_error = None

    async def flush(self, timeout_s: float) -> int:
        """Wait until every queued event is sent; the number left after `timeout_s`."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._queue.join()
        except TimeoutError:
            if self._spool is not None:
                # Whatever is still queued waits on disk for the next start.
                left_over: list[_Outgoing] = []
                while not self._queue.empty():
                    left_over.append(self._queue.get_nowait())
                    self._queue.task_done()
                lost = len(left_over) - self._to_spool(left_over)
                self._spool.sync()
                return lost
            left = self._queue.qsize()
            logger.warning(
                "publish queue not flushed in flush_timeout_s, events lost count=%d",
                left,
            )
            return left
        return 0

    async def stop(self) -> None:
        """Close the producer (after `flush`); idempotent, also when never started."""
        self.started = False
        await self._producer.stop()
        if self._spool is not None:
            self._spool.close()
