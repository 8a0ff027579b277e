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
    PUBLISH_QUEUE_DEPTH,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Outgoing:
    topic: str
    key: bytes
    event: EventModel


class EventPublisher:
    """A bounded in-memory queue in front of an aiokafka producer.

    `publish` only enqueues; `publish_loop` sends batches in the background. When
    the queue is full the event is dropped, counted and logged.

    TODO: spool to a local append-only file instead of dropping when the queue is
    full or the broker refuses a batch. Meanwhile an outage longer than the queue
    (10,000 events by default) loses events, visible as
    flywheel_gateway_events_dropped_total; acceptable while the broker runs next to
    the gateway, not once it is remote.
    """

    def __init__(
        self, producer: AIOKafkaProducer, *, queue_size: int, batch_size: int
    ) -> None:
        self._producer = producer
        self._queue: asyncio.Queue[_Outgoing] = asyncio.Queue(maxsize=queue_size)
        self._batch_size = batch_size
        self.started = False
        # Why the last batch failed, cleared by the next one that succeeds.
        self.last_error: str | None = None
        self.published_count = 0
        self.dropped_count = 0
        PUBLISH_QUEUE_DEPTH.set_function(self._queue.qsize)

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    def publish(self, topic: str, key: str, event: EventModel) -> bool:
        """Enqueue `event` for `topic` keyed by `key`; False when it was dropped."""
        try:
            self._queue.put_nowait(_Outgoing(topic, key.encode(), event))
        except asyncio.QueueFull:
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
                await self._send_batch(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

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
        for item, result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                EVENTS_DROPPED.labels(topic=item.topic, reason="send_failed").inc()
                self.last_error = f"{type(result).__name__}: {result}"
            else:
                published[item.topic] += 1
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
