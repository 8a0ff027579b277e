"""Consumer-group lag, for `flywheel status`."""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from services.common.settings import KafkaSettings


async def consumer_lag(settings: KafkaSettings, groups: list[str]) -> dict[str, int]:
    """Messages not yet committed by each group, summed over its partitions."""
    admin = AIOKafkaAdminClient(**settings.client_options())
    consumer = AIOKafkaConsumer(**settings.client_options())
    await admin.start()
    await consumer.start()
    try:
        lags: dict[str, int] = {}
        for group in groups:
            committed: dict[
                TopicPartition, object
            ] = await admin.list_consumer_group_offsets(group)
            if not committed:
                lags[group] = 0
                continue
            ends = await consumer.end_offsets(list(committed))
            lags[group] = sum(
                max(0, ends[tp] - meta.offset)  # type: ignore[attr-defined]
                for tp, meta in committed.items()
            )
        return lags
    finally:
        await consumer.stop()
        await admin.close()
