"""The collector against the real broker and PostgreSQL, run in-process."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from services.collector import metrics
from services.collector.app import App
from services.collector.settings import CollectorSettings
from services.common.embedded import free_port
from services.common.events import DeadLetter, Feedback, Interaction, encode
from services.common.kafka import Topics, make_producer
from services.common.settings import KafkaSettings, PostgresSettings
from tests.conftest import unique_name, wait_until

pytestmark = pytest.mark.integration

MAX_PAYLOAD_BYTES = 4096


@dataclass(frozen=True)
class Sent:
    """Where a produced record landed."""

    topic: str
    partition: int
    offset: int
    value: bytes | None


def collector_settings(
    kafka_settings: KafkaSettings, pg_settings: PostgresSettings, **changes: Any
) -> CollectorSettings:
    options: dict[str, Any] = {
        "kafka": kafka_settings,
        "postgres": pg_settings,
        "group_id": unique_name("collector-"),
        "max_batch_size": 50,
        "batch_timeout_ms": 100,
        "max_payload_bytes": MAX_PAYLOAD_BYTES,
        "migrate_on_start": False,
        "metrics_port": 0,
        "orphan_refresh_s": 0.2,
        "store_retry_min_s": 0.05,
        "store_retry_max_s": 0.5,
    }
    options.update(changes)
    return CollectorSettings(**options)


@pytest.fixture
async def producer(kafka_settings: KafkaSettings) -> AsyncIterator[AIOKafkaProducer]:
    client = make_producer(kafka_settings, client_id="collector-test")
    await client.start()
    yield client
    await client.stop()


async def start_app(settings: CollectorSettings) -> tuple[App, asyncio.Task[None]]:
    app = App(settings)
    return app, asyncio.create_task(app.run())


async def stop_app(app: App, task: asyncio.Task[None]) -> None:
    app.stop()
    async with asyncio.timeout(30):
        await task


async def send_all(
    producer: AIOKafkaProducer,
    messages: Iterable[tuple[str, bytes | None, bytes | None]],
) -> list[Sent]:
    """Produce in order; return each record's placement, in the same order."""
    pending = [
        (topic, value, await producer.send(topic, value, key=key))
        for topic, key, value in messages
    ]
    results = []
    for topic, value, future in pending:
        metadata = await future
        results.append(Sent(topic, metadata.partition, metadata.offset, value))
    return results


def make_interaction(**changes: Any) -> Interaction:
    now = datetime.now(UTC)
    fields: dict[str, Any] = {
        "project_id": "demo",
        "route": "support-bot",
        "variant": "baseline",
        "request_messages": [{"role": "user", "content": "What is the capital?"}],
        "response_text": "Paris.",
        "latency_s": 0.3,
        "started_at": now,
        "finished_at": now,
    }
    fields.update(changes)
    return Interaction(**fields)


def make_feedback(interaction_id: uuid.UUID, **changes: Any) -> Feedback:
    fields: dict[str, Any] = {"project_id": "demo", "kind": "thumbs", "value": 1}
    fields.update(changes)
    return Feedback(interaction_id=interaction_id, **fields)


def bad_inputs(topics: Topics) -> list[tuple[str, bytes | None, str]]:
    """One record per rejection reason: (topic, value, expected reason)."""
    feedback = make_feedback(uuid.uuid4()).model_dump(mode="json")
    interaction = make_interaction().model_dump(mode="json")
    return [
        (topics.feedback, b"\xff\xfe\x00garbage", "invalid_utf8"),
        (topics.interactions, b'{"project_id": ', "invalid_json"),
        (topics.feedback, b"[1, 2, 3]", "not_an_object"),
        (topics.feedback, dumps(without(feedback, "kind")), "validation_error"),
        (topics.feedback, dumps({**feedback, "kind": "telepathy"}), "validation_error"),
        (topics.feedback, dumps({**feedback, "text": "a\u0000b"}), "nul_character"),
        (
            topics.feedback,
            dumps({**feedback, "text": "x" * MAX_PAYLOAD_BYTES}),
            "oversized_payload",
        ),
        (
            topics.interactions,
            dumps({**interaction, "schema_version": 2}),
            "unsupported_schema_version",
        ),
        (topics.feedback, None, "empty_payload"),
        (
            topics.interactions,
            dumps({**interaction, "usage": {"prompt_tokens": 2**31}}),
            "value_out_of_range",
        ),
    ]


def dumps(data: dict[str, Any]) -> bytes:
    return json.dumps(data).encode()


def without(data: dict[str, Any], key: str) -> dict[str, Any]:
    return {name: value for name, value in data.items() if name != key}


async def read_dead_letters(
    kafka_settings: KafkaSettings, count: int, *, timeout_s: float = 30.0
) -> list[DeadLetter]:
    topic = Topics(kafka_settings.topic_prefix).deadletter
    consumer = AIOKafkaConsumer(
        **kafka_settings.client_options(), auto_offset_reset="earliest"
    )
    await consumer.start()
    letters: list[DeadLetter] = []
    try:
        consumer.assign(
            [TopicPartition(topic, p) for p in range(kafka_settings.partitions)]
        )
        async with asyncio.timeout(timeout_s):
            while len(letters) < count:
                batch = await consumer.getmany(timeout_ms=200)
                for records in batch.values():
                    letters += [
                        DeadLetter.model_validate_json(r.value) for r in records
                    ]
    finally:
        await consumer.stop()
    return letters


async def event_id_counts(pool: asyncpg.Pool, table: str) -> dict[uuid.UUID, int]:
    rows = await pool.fetch(
        f"SELECT event_id, count(*) AS n FROM {table} GROUP BY event_id"  # noqa: S608
    )
    return {row["event_id"]: row["n"] for row in rows}


async def count_rows(pool: asyncpg.Pool, table: str) -> int:
    return int(await pool.fetchval(f"SELECT count(*) FROM {table}"))  # noqa: S608


def counter_value(counter: Any, *labels: str) -> float:
    return float(counter.labels(*labels)._value.get())


async def test_collector_stores_good_events_once_and_dead_letters_bad_ones(
    kafka_settings: KafkaSettings,
    pg_settings: PostgresSettings,
    pg_pool: asyncpg.Pool,
    producer: AIOKafkaProducer,
) -> None:
    topics = Topics(kafka_settings.topic_prefix)
    interactions = [make_interaction() for _ in range(200)]
    # Good, though orjson cannot write it: a number beyond 64 bits in a jsonb field.
    interactions[42] = make_interaction(request_params={"seed": 10**30})
    feedback = [make_feedback(item.interaction_id) for item in interactions]
    orphans = [make_feedback(uuid.uuid4(), kind="copy") for _ in range(3)]
    # Same interaction_id as an earlier one, under a new event_id: a duplicate too.
    clash = make_interaction(interaction_id=interactions[5].interaction_id)
    bad = bad_inputs(topics)
    messages: list[tuple[str, bytes | None, bytes | None]] = []
    bad_at: dict[int, str] = {}
    for index, (interaction, rating) in enumerate(
        zip(interactions, feedback, strict=True)
    ):
        key = str(interaction.interaction_id).encode()
        pair = [(topics.interactions, key, encode(interaction))]
        pair.append((topics.feedback, key, encode(rating)))
        # The first 20 ratings arrive before their interaction.
        messages += reversed(pair) if index < 20 else pair
        if index % 13 == 0:
            # Producer retries: the same events again, as other records.
            bad_at.update({len(messages): "duplicate", len(messages) + 1: "duplicate"})
            messages += pair
        if index % 19 == 7 and bad:
            topic, value, reason = bad.pop()
            bad_at[len(messages)] = reason
            messages.append((topic, f"bad-{index}".encode(), value))
    assert not bad, "every bad input kind is sent"
    messages += [
        (topics.feedback, str(o.interaction_id).encode(), encode(o)) for o in orphans
    ]
    bad_at[len(messages)] = "duplicate"
    messages.append(
        (topics.interactions, str(clash.interaction_id).encode(), encode(clash))
    )
    duplicates_sent = sum(1 for index in range(200) if index % 13 == 0)
    port = free_port()
    settings = collector_settings(kafka_settings, pg_settings, metrics_port=port)

    sent = await send_all(producer, messages)
    app, task = await start_app(settings)
    try:
        await wait_until(
            lambda: (
                app.intake is not None
                and app.intake.totals["consumed"] >= len(messages)
            ),
            timeout_s=60,
        )
        await wait_until(lambda: metrics.ORPHAN_FEEDBACK._value.get() == 3)
        async with httpx.AsyncClient() as client:
            scrape = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    finally:
        await stop_app(app, task)
    letters = await read_dead_letters(kafka_settings, len(bad_at))

    stored_interactions = await event_id_counts(pg_pool, "interactions")
    stored_feedback = await event_id_counts(pg_pool, "feedback")
    assert stored_interactions == {item.event_id: 1 for item in interactions}
    assert stored_feedback == {item.event_id: 1 for item in feedback + orphans}
    seed = await pg_pool.fetchval(
        "SELECT request_params->>'seed' FROM interactions WHERE event_id = $1",
        interactions[42].event_id,
    )
    assert seed == str(10**30)
    assert counter_value(metrics.EVENTS_STORED, topics.interactions) == 200
    assert counter_value(metrics.EVENTS_DUPLICATE, topics.interactions) == (
        duplicates_sent + 1
    )
    assert counter_value(metrics.EVENTS_DUPLICATE, topics.feedback) == duplicates_sent
    expected = {
        (sent[i].topic, sent[i].partition, sent[i].offset): (reason, sent[i].value)
        for i, reason in bad_at.items()
    }
    found = {
        (letter.source_topic, letter.source_partition, letter.source_offset): (
            letter.reason,
            base64.b64decode(letter.original_value_b64) or None,
        )
        for letter in letters
    }
    assert found == expected
    assert {letter.consumer for letter in letters} == {settings.group_id}
    assert "flywheel_collector_events_deadlettered_total" in scrape
    assert "flywheel_collector_consumer_lag" in scrape


async def test_collector_restarted_mid_stream_stores_every_event_once(
    kafka_settings: KafkaSettings,
    pg_settings: PostgresSettings,
    pg_pool: asyncpg.Pool,
    producer: AIOKafkaProducer,
) -> None:
    topics = Topics(kafka_settings.topic_prefix)
    first = [make_feedback(uuid.uuid4()) for _ in range(1500)]
    second = [make_feedback(uuid.uuid4()) for _ in range(100)]
    settings = collector_settings(
        kafka_settings, pg_settings, max_batch_size=10, batch_timeout_ms=50
    )

    await send_all(producer, feedback_messages(topics, first))
    app, task = await start_app(settings)
    await wait_until(lambda: count_rows_at_least(pg_pool, 50), interval_s=0.01)
    # A crash mid-stream: cancelled, so the batch in hand is never committed.
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    stored_before_restart = await count_rows(pg_pool, "feedback")
    await send_all(producer, feedback_messages(topics, second))
    app, task = await start_app(settings)
    try:
        await wait_until(lambda: count_rows_at_least(pg_pool, 1600), timeout_s=60)
    finally:
        await stop_app(app, task)

    assert stored_before_restart < len(first)
    stored = await event_id_counts(pg_pool, "feedback")
    assert stored == {item.event_id: 1 for item in first + second}


def feedback_messages(
    topics: Topics, events: list[Feedback]
) -> list[tuple[str, bytes | None, bytes | None]]:
    return [
        (topics.feedback, str(event.interaction_id).encode(), encode(event))
        for event in events
    ]


async def count_rows_at_least(pool: asyncpg.Pool, count: int) -> bool:
    return await count_rows(pool, "feedback") >= count


async def test_collector_retries_while_table_is_unavailable_without_committing(
    kafka_settings: KafkaSettings,
    pg_settings: PostgresSettings,
    pg_pool: asyncpg.Pool,
    producer: AIOKafkaProducer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    topics = Topics(kafka_settings.topic_prefix)
    events = [make_feedback(uuid.uuid4()) for _ in range(20)]
    settings = collector_settings(kafka_settings, pg_settings)
    retries_before = metrics.STORE_RETRIES._value.get()
    # PostgreSQL up but the table gone: every batch fails the way an outage does.
    await pg_pool.execute("ALTER TABLE feedback RENAME TO feedback_parked")

    await send_all(producer, feedback_messages(topics, events))
    app, task = await start_app(settings)
    try:
        await wait_until(
            lambda: metrics.STORE_RETRIES._value.get() >= retries_before + 3
        )
        assert app.intake is not None
        committed_during_outage = app.intake.totals["batches"]
        await pg_pool.execute("ALTER TABLE feedback_parked RENAME TO feedback")
        await wait_until(lambda: count_rows_at_least(pg_pool, len(events)))
    finally:
        await stop_app(app, task)

    assert committed_during_outage == 0
    assert await event_id_counts(pg_pool, "feedback") == {e.event_id: 1 for e in events}
    assert any(
        record.levelname == "WARNING" and "not committing" in record.getMessage()
        for record in caplog.records
    )


async def test_collector_dead_letters_rows_postgresql_refuses_and_keeps_the_rest(
    kafka_settings: KafkaSettings,
    pg_settings: PostgresSettings,
    pg_pool: asyncpg.Pool,
    producer: AIOKafkaProducer,
) -> None:
    topics = Topics(kafka_settings.topic_prefix)
    interaction_id = uuid.uuid4()
    values = [0.1, 0.95, 0.2, 0.3, 0.99]
    events = [make_feedback(interaction_id, kind="score", value=v) for v in values]
    settings = collector_settings(kafka_settings, pg_settings)
    # A rule only the database knows, so validation lets these rows through.
    await pg_pool.execute(
        "ALTER TABLE feedback ADD CONSTRAINT value_below CHECK (value < 0.9)"
    )

    sent = await send_all(producer, feedback_messages(topics, events))
    app, task = await start_app(settings)
    try:
        letters = await read_dead_letters(kafka_settings, 2)
        await wait_until(lambda: count_rows_at_least(pg_pool, 3))
    finally:
        await stop_app(app, task)

    kept = [e for e in events if e.value is not None and e.value < 0.9]
    assert await event_id_counts(pg_pool, "feedback") == {e.event_id: 1 for e in kept}
    assert {(letter.reason, letter.source_offset) for letter in letters} == {
        ("storage_rejected", sent[1].offset),
        ("storage_rejected", sent[4].offset),
    }
