"""The store's staging tables and the intake's overlap of two batches, on real parts.

A batch is COPYed into per-session staging tables inside its transaction, then claimed
(keys first, rows for the keys it won) when the batch before it has finished.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from services.collector.consumer import Batch, EventConsumer
from services.collector.handlers import feedback_row, interaction_row
from services.collector.publisher import DeadLetterPublisher
from services.collector.store import EventStore, RowRefusedError
from services.common import db
from services.common.events import encode
from services.common.kafka import Topics, make_consumer
from services.common.settings import KafkaSettings, PostgresSettings
from tests.conftest import unique_name, wait_until
from tests.integration.test_collector import (
    collector_settings,
    count_rows,
    event_id_counts,
    make_feedback,
    make_interaction,
    producer,  # noqa: F401 (fixture)
)

pytestmark = pytest.mark.integration


class StagedThenFailedError(Exception):
    """Raised inside a staged block by the test."""


@pytest.fixture
async def one_connection_pool(
    pg_settings: PostgresSettings,
) -> AsyncIterator[asyncpg.Pool]:
    """A pool of one connection: every batch reuses the same staging tables."""
    pool = await asyncpg.create_pool(
        pg_settings.dsn.get_secret_value(),
        min_size=1,
        max_size=1,
        server_settings={"search_path": pg_settings.db_schema},
    )
    assert pool is not None
    yield pool
    await pool.close()


async def test_staged_rows_are_stored_only_when_the_block_commits(
    pg_pool: asyncpg.Pool,
) -> None:
    store = EventStore(pg_pool)
    interaction = make_interaction()
    rating = make_feedback(interaction.interaction_id)

    async with store.staged(
        [interaction_row(interaction)], [feedback_row(rating)]
    ) as batch:
        keys_before_claim = await count_rows(pg_pool, "event_keys")
        stored = await batch.claim()
        keys_before_commit = await count_rows(pg_pool, "event_keys")
    keys_after = await count_rows(pg_pool, "event_keys")

    assert (keys_before_claim, keys_before_commit, keys_after) == (0, 0, 2)
    assert stored == (1, 1)
    assert await event_id_counts(pg_pool, "interactions") == {interaction.event_id: 1}


async def test_staged_block_that_fails_stores_nothing_and_leaves_nothing_staged(
    one_connection_pool: asyncpg.Pool,
) -> None:
    store = EventStore(one_connection_pool)
    dropped = [make_interaction() for _ in range(3)]
    kept = make_interaction()

    with pytest.raises(StagedThenFailedError):
        async with store.staged([interaction_row(item) for item in dropped], []):
            raise StagedThenFailedError
    stored = await store.insert_batch([interaction_row(kept)], [])

    assert stored == (1, 0)
    assert await event_id_counts(one_connection_pool, "interactions") == {
        kept.event_id: 1
    }
    assert await count_rows(one_connection_pool, "event_keys") == 1


async def test_repeats_within_a_batch_keep_the_first_in_batch_order(
    one_connection_pool: asyncpg.Pool,
) -> None:
    store = EventStore(one_connection_pool)
    # Several events for each interaction, the later ones repeated.
    batches = []
    for _ in range(3):
        first = make_interaction()
        later = [
            make_interaction(interaction_id=first.interaction_id) for _ in range(3)
        ]
        batches.append((first, [first, *later, *later]))
    rows = [interaction_row(event) for _, events in batches for event in events]

    stored = await store.insert_batch(rows, [])

    assert stored == (3, 0)
    assert await event_id_counts(one_connection_pool, "interactions") == {
        first.event_id: 1 for first, _ in batches
    }


async def test_batch_staged_but_not_claimed_is_gone_from_the_next_transaction(
    one_connection_pool: asyncpg.Pool,
) -> None:
    store = EventStore(one_connection_pool)
    unclaimed = [make_interaction() for _ in range(4)]
    kept = make_interaction()

    async with store.staged([interaction_row(i) for i in unclaimed], []):
        pass
    stored = await store.insert_batch([interaction_row(kept)], [])

    assert stored == (1, 0)
    assert await event_id_counts(one_connection_pool, "interactions") == {
        kept.event_id: 1
    }


async def test_value_that_cannot_be_encoded_is_refused_and_the_connection_recovers(
    one_connection_pool: asyncpg.Pool,
) -> None:
    store = EventStore(one_connection_pool)
    rating = make_feedback(uuid.uuid4())
    # A value no validated event carries: `value` is float8, not text.
    bad = list(feedback_row(rating))
    bad[4] = "very good"
    good = make_feedback(uuid.uuid4())

    with pytest.raises(RowRefusedError):
        await store.insert_batch([], [tuple(bad)])
    stored = await store.insert_batch([], [feedback_row(good)])

    assert stored == (0, 1)
    assert await event_id_counts(one_connection_pool, "feedback") == {good.event_id: 1}


async def fetch_one_by_one(consumer: AIOKafkaConsumer, count: int) -> list[Batch]:
    """`count` batches of one record each, in partition order."""
    batches: list[Batch] = []
    async with asyncio.timeout(30):
        while len(batches) < count:
            batch = await consumer.getmany(timeout_ms=200, max_records=1)
            if batch:
                batches.append(batch)
    return batches


async def staged_and_waiting(pool: asyncpg.Pool) -> bool:
    """Whether a session sits in its transaction right after staging interactions."""
    count = await pool.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction'"
        " AND query LIKE '%collector_batch_interactions%'"
    )
    return bool(count)


async def test_next_batch_claims_only_after_the_batch_before_it_finished(
    kafka_settings: KafkaSettings,
    pg_settings: PostgresSettings,
    pg_pool: asyncpg.Pool,
    producer: AIOKafkaProducer,  # noqa: F811 (fixture)
) -> None:
    topics = Topics(kafka_settings.topic_prefix)
    settings = collector_settings(kafka_settings, pg_settings)
    # Two events for one interaction: the first in Kafka order must win.
    first = make_interaction()
    second = make_interaction(interaction_id=first.interaction_id)
    key = str(first.interaction_id).encode()
    for event in (first, second):
        await (await producer.send(topics.interactions, encode(event), key=key))
    consumer = make_consumer(
        kafka_settings,
        topics.interactions,
        group_id=unique_name("store-order-"),
        client_id="store-order-test",
    )
    await consumer.start()
    pool = await db.create_pool(pg_settings)
    stop = asyncio.Event()
    gate = asyncio.Event()
    try:
        intake = EventConsumer(
            consumer,
            EventStore(pool),
            DeadLetterPublisher(producer, topics.deadletter, timeout_s=10),
            settings,
        )
        batch_a, batch_b = await fetch_one_by_one(consumer, 2)

        async def finish_first_when_let() -> None:
            await gate.wait()
            await intake.finish_batch(intake.prepare_batch(batch_a), stop)

        task_a = asyncio.create_task(finish_first_when_let())
        task_b = asyncio.create_task(
            intake.finish_batch(intake.prepare_batch(batch_b), stop, task_a)
        )
        await wait_until(lambda: staged_and_waiting(pg_pool))
        keys_while_first_waits = await count_rows(pg_pool, "event_keys")
        gate.set()
        async with asyncio.timeout(30):
            await asyncio.gather(task_a, task_b)
    finally:
        await pool.close()
        await consumer.stop()

    assert keys_while_first_waits == 0
    assert await event_id_counts(pg_pool, "interactions") == {first.event_id: 1}
    assert (intake.totals["stored"], intake.totals["duplicates"]) == (1, 1)
