"""The store's two write paths and the order of overlapping batches, on real parts.

A batch that repeats nothing is COPYed straight into the key tables and the event
tables; one that repeats a stored event (or one of its own) is rolled back and takes
the keyed path: staged, then claimed, keys first. A batch writes its keys only after
the batch before it wrote its own, and commits only after that batch committed
(services/collector/ordering.py).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from asyncpg.exceptions import InternalClientError

from services.collector import metrics
from services.collector.consumer import Batch, EventConsumer
from services.collector.errors import StoreUnavailableError
from services.collector.handlers import feedback_row, interaction_row
from services.collector.ordering import (
    EarlierBatchAbandonedError,
    TurnState,
    WriteTurn,
)
from services.collector.publisher import DeadLetterPublisher
from services.collector.store import (
    EventStore,
    RowRefusedError,
    StoreMisconfiguredError,
    _wrap,
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

    assert stored.counts == (3, 3)
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

    assert stored.counts == (1, 0)
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

    assert stored.counts == (3, 0)
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

    assert stored.counts == (1, 0)
    assert await event_id_counts(store_pool, "interactions") == {own.event_id: 1}


async def copy_waits_on_a_lock(pool: asyncpg.Pool, table: str = "event_keys") -> bool:
    """Whether a session's COPY into `table` waits for another's lock."""
    count = await pool.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
        " AND query LIKE $1",
        f"COPY%{table}%",
    )
    return bool(count)


async def test_row_refused_by_postgresql_stores_nothing_of_its_batch(
    store_pool: asyncpg.Pool,
) -> None:
    store = EventStore(store_pool)
    kept = make_feedback(uuid.uuid4())
    # Plaintext beside a key id: the table's CHECK refuses it, after the keys were
    # COPYed (inside the same transaction).
    refused = list(feedback_row(make_feedback(uuid.uuid4(), text="hello")))
    refused[8] = "some-key"

    with pytest.raises(RowRefusedError):
        await store.insert_batch([], [feedback_row(kept), tuple(refused)])
    stored = await store.insert_batch([], [feedback_row(kept)])

    assert stored.counts == (0, 1)
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

    assert stored.counts == (0, 1)
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


async def test_next_batch_writes_no_key_before_the_batch_before_wrote_its_own(
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

        turn_a = WriteTurn()

        async def finish_first_when_let() -> None:
            await gate.wait()
            await intake.finish_batch(intake.prepare_batch(batch_a), stop, None, turn_a)

        task_a = asyncio.create_task(finish_first_when_let())
        task_b = asyncio.create_task(
            intake.finish_batch(
                intake.prepare_batch(batch_b), stop, task_a, WriteTurn(turn_a)
            )
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


class HeldTurn(WriteTurn):
    """A batch's turn that waits at its commit until the test lets it go."""

    def __init__(self, before: WriteTurn | None = None) -> None:
        super().__init__(before)
        self.release = asyncio.Event()
        self.fail_once = False

    async def may_commit(self) -> None:
        await self.release.wait()
        if self.fail_once:
            self.fail_once = False
            raise StoreUnavailableError("this attempt fails (the test)")
        await super().may_commit()


async def hold_at_commit(
    store: EventStore, rows: list[tuple[object, ...]]
) -> tuple[HeldTurn, asyncio.Task[tuple[int, int]]]:
    """A batch that has written its keys and waits at its commit."""
    turn = HeldTurn()
    task = asyncio.create_task(store.insert_batch(rows, [], turn))
    await wait_until(lambda: turn.state is TurnState.CLAIMED)
    return turn, task


async def test_next_batch_writes_while_the_one_before_commits_and_commits_after_it(
    store_pool: asyncpg.Pool,
) -> None:
    store = EventStore(store_pool)
    earlier, later = make_interaction(), make_interaction()
    turn_a, task_a = await hold_at_commit(store, [interaction_row(earlier)])

    turn_b = WriteTurn(turn_a)
    task_b = asyncio.create_task(
        store.insert_batch([interaction_row(later)], [], turn_b)
    )
    # The later batch writes all its keys while the earlier one is uncommitted...
    await wait_until(lambda: turn_b.state is TurnState.CLAIMED)
    # ...and does not commit before it.
    await asyncio.sleep(0.2)
    committed_early = task_b.done()
    turn_a.release.set()
    async with asyncio.timeout(30):
        stored = [s.counts for s in await asyncio.gather(task_a, task_b)]

    assert committed_early is False
    assert stored == [(1, 0), (1, 0)]
    assert await event_id_counts(store_pool, "interactions") == {
        earlier.event_id: 1,
        later.event_id: 1,
    }


async def test_interaction_repeated_across_overlapping_batches_goes_to_the_earlier(
    store_pool: asyncpg.Pool,
) -> None:
    store = EventStore(store_pool)
    first = make_interaction()
    repeat = make_interaction(interaction_id=first.interaction_id)
    other = make_interaction()
    turn_a, task_a = await hold_at_commit(store, [interaction_row(first)])

    task_b = asyncio.create_task(
        store.insert_batch(
            [interaction_row(other), interaction_row(repeat)], [], WriteTurn(turn_a)
        )
    )
    # The repeated interaction id waits on the earlier batch's open transaction.
    await wait_until(lambda: copy_waits_on_a_lock(store_pool, "interaction_keys"))
    assert not task_b.done()
    turn_a.release.set()
    async with asyncio.timeout(30):
        stored = [s.counts for s in await asyncio.gather(task_a, task_b)]

    assert stored == [(1, 0), (1, 0)]
    assert await event_id_counts(store_pool, "interactions") == {
        first.event_id: 1,
        other.event_id: 1,
    }


async def test_earlier_batch_failing_rolls_back_the_later_one_until_it_is_retried(
    store_pool: asyncpg.Pool,
) -> None:
    store = EventStore(store_pool)
    earlier, later = make_interaction(), make_interaction()
    turn_a, task_a = await hold_at_commit(store, [interaction_row(earlier)])
    turn_a.fail_once = True
    turn_b = WriteTurn(turn_a)
    task_b = asyncio.create_task(
        store.insert_batch([interaction_row(later)], [], turn_b)
    )
    await wait_until(lambda: turn_b.state is TurnState.CLAIMED)

    turn_a.release.set()
    async with asyncio.timeout(30):
        outcomes = await asyncio.gather(task_a, task_b, return_exceptions=True)
    keys_after_failure = await count_rows(store_pool, "event_keys")
    # Both retried (as the intake's retry loop would), the earlier one first.
    retry_b = asyncio.create_task(
        store.insert_batch([interaction_row(later)], [], turn_b)
    )
    await asyncio.sleep(0.2)
    later_waited = not retry_b.done()
    async with asyncio.timeout(30):
        retried = [
            await store.insert_batch([interaction_row(earlier)], [], turn_a),
            await retry_b,
        ]

    assert [type(outcome) for outcome in outcomes] == [
        StoreUnavailableError,
        StoreUnavailableError,
    ]
    assert keys_after_failure == 0
    assert later_waited is True
    assert [s.counts for s in retried] == [(1, 0), (1, 0)]
    assert await count_rows(store_pool, "interactions") == 2


async def test_earlier_batch_abandoned_leaves_the_later_one_uncommitted(
    store_pool: asyncpg.Pool,
) -> None:
    store = EventStore(store_pool)
    turn_a, task_a = await hold_at_commit(store, [interaction_row(make_interaction())])
    turn_b = WriteTurn(turn_a)
    task_b = asyncio.create_task(
        store.insert_batch([interaction_row(make_interaction())], [], turn_b)
    )
    await wait_until(lambda: turn_b.state is TurnState.CLAIMED)

    # The earlier batch's task is cancelled (a stop, a crash): the later one rolls
    # back at once; the owner then abandons the earlier batch, and the later one's
    # retry ends for good.
    task_a.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task_a
    with pytest.raises(StoreUnavailableError):
        async with asyncio.timeout(30):
            await task_b
    turn_a.abandon()
    with pytest.raises(EarlierBatchAbandonedError):
        await store.insert_batch([interaction_row(make_interaction())], [], turn_b)

    assert await count_rows(store_pool, "event_keys") == 0


async def test_repeat_by_another_record_is_reported_and_a_replay_is_not(
    store_pool: asyncpg.Pool,
) -> None:
    store = EventStore(store_pool)
    first, other = make_interaction(), make_interaction()
    clash = make_interaction(interaction_id=first.interaction_id)
    rating = make_feedback(first.interaction_id)
    topic = "flywheel.interactions.v1"
    await store.insert_batch(
        [interaction_row(first)],
        [feedback_row(rating)],
        sources=([(topic, 0, 10)], [("flywheel.feedback.v1", 1, 4)]),
    )

    # The same records read again, the first event retried as another record, a
    # new event, an interaction_id stored under another event, and the rating
    # retried too.
    stored = await store.insert_batch(
        [interaction_row(first)] * 2 + [interaction_row(other), interaction_row(clash)],
        [feedback_row(rating)],
        sources=(
            [(topic, 0, 10), (topic, 0, 11), (topic, 0, 12), (topic, 0, 13)],
            [("flywheel.feedback.v1", 1, 9)],
        ),
    )

    assert stored.counts == (1, 0)
    reported = {repeat.source: repeat.detail for repeat in stored.repeats}
    assert set(reported) == {
        (topic, 0, 11),
        (topic, 0, 13),
        ("flywheel.feedback.v1", 1, 9),
    }
    assert f"seen already, in {topic} partition 0 offset 10" in reported[(topic, 0, 11)]
    assert "interaction_id is stored already" in reported[(topic, 0, 13)]


async def test_repeat_of_a_key_stored_without_its_source_is_only_counted(
    store_pool: asyncpg.Pool,
) -> None:
    """Keys stored before their source was (migration 0013) have none."""
    store = EventStore(store_pool)
    event = make_interaction()
    await store.insert_batch([interaction_row(event)], [])

    stored = await store.insert_batch(
        [interaction_row(event)], [], sources=([("t", 0, 1)], [])
    )

    assert stored == (0, 0, ())


async def test_new_partition_between_overlapping_batches_waits_for_them(
    pg_settings: PostgresSettings, pg_pool: asyncpg.Pool
) -> None:
    """A day partition created while a batch waits for the one before to commit.

    Without the batch's table locks taken first, the creation queued between the
    two batches' locks makes a cycle PostgreSQL cannot see (the later batch waits
    for the earlier in the intake), which only the command timeout would end.
    """
    command_timeout_s = 8.0
    pool = await db.create_pool(
        pg_settings.model_copy(update={"command_timeout_s": command_timeout_s}),
        jsonb_as="text",
    )
    store = EventStore(pool)
    today, ahead = await pg_pool.fetchrow(
        "SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYYMMDD'),"
        " to_char((now() AT TIME ZONE 'UTC')::date + 7, 'YYYYMMDD')"
    )
    # The partition the next maintenance run creates.
    await pg_pool.execute(f"DROP TABLE feedback_p{ahead}")
    holder = await pg_pool.acquire()
    try:
        # Holds the earlier batch inside its COPY into interactions for a moment,
        # as a large batch would take.
        hold = holder.transaction()
        await hold.start()
        await holder.execute(f"LOCK TABLE interactions_p{today} IN SHARE MODE")
        turn_a = WriteTurn()
        task_a = asyncio.create_task(
            store.insert_batch(
                [interaction_row(make_interaction())],
                [feedback_row(make_feedback(uuid.uuid4()))],
                turn_a,
            )
        )
        await wait_until(lambda: turn_a.state is TurnState.CLAIMED)
        # The later batch writes its feedback and waits for the earlier one.
        task_b = asyncio.create_task(
            store.insert_batch(
                [], [feedback_row(make_feedback(uuid.uuid4()))], WriteTurn(turn_a)
            )
        )
        await wait_until(lambda: session_in(pg_pool, "idle in transaction", "feedback"))
        maintenance = asyncio.create_task(store.ensure_partitions(7))
        await wait_until(lambda: session_waits_on_lock(pg_pool, "ensure_event"))
        await hold.commit()

        async with asyncio.timeout(command_timeout_s / 2):
            outcomes = await asyncio.gather(task_a, task_b, maintenance)
    finally:
        await pg_pool.release(holder)
        await pool.close()

    assert [outcome.counts for outcome in outcomes[:2]] == [(1, 1), (0, 1)]
    assert outcomes[2] == 1
    assert await pg_pool.fetchval(
        "SELECT to_regclass($1) IS NOT NULL", f"feedback_p{ahead}"
    )


async def session_in(pool: asyncpg.Pool, state: str, query_part: str) -> bool:
    count = await pool.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE state = $1 AND query LIKE $2",
        state,
        f"%{query_part}%",
    )
    return bool(count)


async def session_waits_on_lock(pool: asyncpg.Pool, query_part: str) -> bool:
    count = await pool.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
        " AND query LIKE $1 AND query NOT LIKE '%pg_stat_activity%'",
        f"%{query_part}%",
    )
    return bool(count)


async def test_lost_session_is_retriable_and_the_next_batch_gets_a_new_one(
    store_pool: asyncpg.Pool, pg_pool: asyncpg.Pool
) -> None:
    """PostgreSQL ends the session of a batch in flight (a restart, an operator)."""
    store = EventStore(store_pool)
    lost, kept = make_interaction(), make_interaction()
    turn, task = await hold_at_commit(store, [interaction_row(lost)])
    await pg_pool.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE state = 'idle in transaction' AND query LIKE 'COPY%interactions%'"
    )
    turn.release.set()

    with pytest.raises(StoreUnavailableError):
        async with asyncio.timeout(30):
            await task
    stored = await store.insert_batch([interaction_row(kept)], [])

    assert stored.counts == (1, 0)
    assert await event_id_counts(store_pool, "interactions") == {kept.event_id: 1}


def test_connection_left_mid_operation_is_not_a_misconfigured_store() -> None:
    busy = InternalClientError(
        "cannot switch to state 15; another operation (2) is in progress"
    )

    assert isinstance(_wrap(busy), StoreUnavailableError)
    assert isinstance(_wrap(InternalClientError("no encoder")), StoreMisconfiguredError)
