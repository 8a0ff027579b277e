"""Kafka helpers: topic names, topic declaration, producer and consumer factories."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from services.common.settings import KafkaSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Topics:
    """Every topic name Flywheel uses, derived from one prefix."""

    prefix: str

    @property
    def interactions(self) -> str:
        return f"{self.prefix}interactions.v1"

    @property
    def feedback(self) -> str:
        return f"{self.prefix}feedback.v1"

    @property
    def deadletter(self) -> str:
        return f"{self.prefix}deadletter.v1"

    @property
    def experiments(self) -> str:
        return f"{self.prefix}experiments.v1"

    def all(self) -> list[str]:
        """The topics declared before any service starts."""
        return [self.interactions, self.feedback, self.deadletter, self.experiments]


async def ensure_topics(
    settings: KafkaSettings, names: list[str], *, timeout_s: float = 30.0
) -> list[str]:
    """Create the topics that do not exist yet, with the configured partition count.

    Idempotent. Returns the names it created. Every topic must be declared before the
    services start: a topic created implicitly by a producer gets the broker's default
    partition count, and faust refuses a table whose changelog differs from its source.
    """
    admin = AIOKafkaAdminClient(**settings.client_options())
    created: list[str] = []
    async with asyncio.timeout(timeout_s):
        await admin.start()
        try:
            existing = set(await admin.list_topics())
            missing = [name for name in names if name not in existing]
            for name in missing:
                topic = NewTopic(
                    name=name,
                    num_partitions=settings.partitions,
                    replication_factor=settings.replication_factor,
                )
                try:
                    await admin.create_topics([topic])
                    created.append(name)
                except TopicAlreadyExistsError:
                    pass
        finally:
            await admin.close()
    if created:
        logger.info(
            "topics created names=%s partitions=%d", created, settings.partitions
        )
    return created


async def wait_for_broker(settings: KafkaSettings, *, timeout_s: float = 30.0) -> None:
    """Poll until the broker answers a metadata request, or raise TimeoutError."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        admin = AIOKafkaAdminClient(**settings.client_options())
        try:
            async with asyncio.timeout(5):
                await admin.start()
                await admin.list_topics()
            return
        except (KafkaError, OSError, TimeoutError) as error:
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(
                    f"Kafka at {settings.bootstrap_servers} did not answer in "
                    f"{timeout_s:.0f} s: {error!r}"
                ) from error
            await asyncio.sleep(0.3)
        finally:
            await admin.close()


def make_producer(
    settings: KafkaSettings, *, client_id: str, max_request_size: int = 1024 * 1024
) -> AIOKafkaProducer:
    """A producer with acks=all and the configured idempotence (off by default)."""
    return AIOKafkaProducer(
        max_request_size=max_request_size,
        **settings.client_options(),
        client_id=client_id,
        acks="all",
        enable_idempotence=settings.enable_idempotence,
        linger_ms=5,
        max_batch_size=settings.producer_max_batch_bytes,
        compression_type=None,
    )


def make_consumer(
    settings: KafkaSettings, *topics: str, group_id: str, client_id: str
) -> AIOKafkaConsumer:
    """A consumer in `group_id` with manual commits, starting from the earliest offset.

    Offsets are committed by the caller only after what it read is stored, so a crash
    replays the batch instead of losing it.
    """
    return AIOKafkaConsumer(
        *topics,
        **settings.client_options(),
        group_id=group_id,
        client_id=client_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=10_000,
        heartbeat_interval_ms=1_000,
        max_poll_interval_ms=300_000,
        fetch_max_wait_ms=settings.consumer_fetch_max_wait_ms,
    )
