"""The store's two write paths and the intake's ordering of batches, on real parts.

A batch that repeats nothing is COPYed straight into the key tables and the event
tables inside a savepoint; one that repeats a stored event (or one of its own) rolls
the savepoint back and takes the keyed path: staged, then claimed, keys first. A batch
writes only after the batch before it finished.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from services.collector import metrics
from services.collector.consumer import Batch, EventConsumer
from services.collector.handlers import feedback_row, interaction_row
from services.collector.publisher import DeadLetterPublisher
from services.collector.store import (
    EventStore,
    RowRefusedError,
    StoreMisconfiguredError,
)
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


@pytest.fixture
async def one_connection_pool(
    pg_settings: PostgresSettings,
) -> AsyncIterator[asyncpg.Pool]:
    """A pool of one connection: every batch reuses the same session."""
    pool = await asyncpg.create_pool(
        pg_settings.dsn.get_secret_value(),
        min_size=1,
        max_size=1,
        server_settings={"search_path": pg_settings.db_schema},
    )
    assert pool is not None
    yield pool
    await pool.close()


def repeat_batches() -> float:
    return float(metrics.REPEAT_BATCHES._value.get())


async def test_batch_of_new_events_is_copied_without_the_keyed_path(
    store_pool: asyncpg.Pool,
) -> None:
    store = EventStore(store_pool)
    interactions = [make_interaction() for _ in range(3)]
    ratings = [make_feedback(item.interaction_id) for item in interactions]
    before = repeat_batches()

    stored = await store.insert_batch(
        [interaction_row(item) for item in interactions],
        [feedback_row(item) for item in ratings],
    )

    assert stored == (3, 3)
    assert repeat_batches() == before
    assert await count_rows(store_pool, "event_keys") == 6
    assert await count_rows(store_pool, "interaction_keys") == 3
    assert await event_id_counts(store_pool, "feedback") == {
        item.event_id: 1 for item in ratings
    }
    messages = await store_pool.fetchval(
        "SELECT request_messages->0->>'content' FROM interactions LIMIT 1"
    )
    assert messages == "What is the capital?"


async def test_batch_repeating_a_stored_event_stores_only_the_new_ones(
    store_pool: asyncpg.Pool,
) -> None:
    store = EventStore(store_pool)
    old = make_interaction()
    new = make_interaction()
    await store.insert_batch([interaction_row(old)], [])
    before = repeat_batches()

    stored = await store.insert_batch([interaction_row(old), interaction_row(new)], [])

    assert stored == (1, 0)
    assert repeat_batches() == before + 1
    assert await event_id_counts(store_pool, "interactions") == {
        old.event_id: 1,
        new.event_id: 1,
    }


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


async def test_key_held_by_an_open_transaction_waits_then_counts_as_a_duplicate(
    store_pool: asyncpg.Pool,
) -> None:
    """Two collectors during a rebalance: the other one's batch holds a key."""
    store = EventStore(store_pool)
    shared = make_interaction()
    own = make_interaction()
    async with store_pool.acquire() as other:
        transaction = other.transaction()
        await transaction.start()
        await other.execute(
            "INSERT INTO event_keys (event_id) VALUES ($1)", shared.event_id
        )
        insert = asyncio.create_task(
            store.insert_batch([interaction_row(shared), interaction_row(own)], [])
        )
        await wait_until(lambda: copy_waits_on_a_lock(store_pool))
        assert not insert.done()
        await transaction.commit()
    async with asyncio.timeout(30):
        stored = await insert

    assert stored == (1, 0)
    assert await event_id_counts(store_pool, "interactions") == {own.event_id: 1}


async def copy_waits_on_a_lock(pool: asyncpg.Pool) -> bool:
    """Whether a session's COPY into event_keys waits for another's lock."""
    count = await pool.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
        " AND query LIKE 'COPY%event_keys%'"
    )
    return bool(count)


async def test_row_refused_by_postgresql_stores_nothing_of_its_batch(
    store_pool: asyncpg.Pool,
) -> None:
    store = EventStore(store_pool)
    kept = make_feedback(uuid.uuid4())
    # Plaintext beside a key id: the table's CHECK refuses it, after the keys were
    # COPYed (inside the same savepoint and transaction).
    refused = list(feedback_row(make_feedback(uuid.uuid4(), text="hello")))
    refused[8] = "some-key"

    with pytest.raises(RowRefusedError):
        await store.insert_batch([], [feedback_row(kept), tuple(refused)])
    stored = await store.insert_batch([], [feedback_row(kept)])

    assert stored == (0, 1)
    assert await count_rows(store_pool, "event_keys") == 1
    assert await event_id_counts(store_pool, "feedback") == {kept.event_id: 1}


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


async def test_pool_whose_jsonb_codec_cannot_copy_fails_loudly_not_retried(
    pg_pool: asyncpg.Pool,
) -> None:
    # pg_pool reads jsonb as Python objects, in the text format: COPY cannot use it.
    store = EventStore(pg_pool)

    with pytest.raises(StoreMisconfiguredError) as raised:
        await store.insert_batch([interaction_row(make_interaction())], [])

    assert not raised.value.retriable
    assert await count_rows(pg_pool, "event_keys") == 0


async def fetch_one_by_one(consumer: AIOKafkaConsumer, count: int) -> list[Batch]:
    """`count` batches of one record each, in partition order."""
    batches: list[Batch] = []
    async with asyncio.timeout(30):
        while len(batches) < count:
            batch = await consumer.getmany(timeout_ms=200, max_records=1)
            if batch:
                batches.append(batch)
    return batches


async def test_next_batch_writes_only_after_the_batch_before_it_finished(
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
    pool = await db.create_pool(pg_settings, jsonb_as="text")
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
        # The second batch may not write while the first waits (no positive signal
        # exists for "waiting on the batch before"; a wrong order writes at once).
        await asyncio.sleep(0.3)
        keys_while_first_waits = await count_rows(pg_pool, "event_keys")
        second_done_early = task_b.done()
        gate.set()
        async with asyncio.timeout(30):
            await asyncio.gather(task_a, task_b)
    finally:
        await pool.close()
        await consumer.stop()

    assert (keys_while_first_waits, second_done_early) == (0, False)
    assert await event_id_counts(pg_pool, "interactions") == {first.event_id: 1}
    assert (intake.totals["stored"], intake.totals["duplicates"]) == (1, 1)
