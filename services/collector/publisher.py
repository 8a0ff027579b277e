"""Kafka adapter for dead letters: publish a set and wait for every acknowledgement."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from services.collector.errors import DeadLetterPublishError
from services.common.events import DeadLetter, encode

logger = logging.getLogger(__name__)


class DeadLetterPublisher:
    """Sends dead letters keyed like their source record (same partitioning)."""

    def __init__(
        self, producer: AIOKafkaProducer, topic: str, *, timeout_s: float
    ) -> None:
        self._producer = producer
        self._topic = topic
        self._timeout_s = timeout_s

    async def publish(self, letters: Sequence[tuple[bytes | None, DeadLetter]]) -> None:
        """Publish every letter; return only once the broker acknowledged all of them.

        Raises DeadLetterPublishError (retriable) when one is not acknowledged in time.
        """
        if not letters:
            return
        try:
            async with asyncio.timeout(self._timeout_s):
                pending = [
                    await self._producer.send(self._topic, encode(letter), key=key)
                    for key, letter in letters
                ]
                await asyncio.gather(*pending)
        except (KafkaError, TimeoutError) as error:
            raise DeadLetterPublishError(
                f"{len(letters)} dead letters to {self._topic} not acknowledged "
                f"within {self._timeout_s:.0f} s (kafka_timeout_s): {error!r}"
            ) from error
