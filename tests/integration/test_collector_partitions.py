"""Events partitioned by day with retention, and exactly-once kept by the key tables."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer

from services.collector.handlers import feedback_row, interaction_row
from services.collector.store import EventStore
from services.common import db
from services.common.embedded import EmbeddedPostgres
from services.common.events import Feedback, Interaction
from services.common.kafka import Topics
from services.common.settings import KafkaSettings, PostgresSettings
from tests.conftest import unique_name, wait_until
from tests.integration.test_collector import (
    collector_settings,
    count_rows,
    event_id_counts,
    make_feedback,
    make_interaction,
    producer,  # noqa: F401 (fixture)
    start_app,
    stop_app,
)
from tests.integration.test_collector_crash import send_load

pytestmark = pytest.mark.integration


async def partitions_of(pool: asyncpg.Pool, table: str) -> set[str]:
    rows = await pool.fetch(
        "SELECT child.relname FROM pg_inherits"
        " JOIN pg_class AS child ON child.oid = inhrelid"
        " JOIN pg_class AS parent ON parent.oid = inhparent"
        " WHERE parent.relname = $1"
        " AND parent.relnamespace = current_schema()::regnamespace",
        table,
    )
    return {row["relname"] for row in rows}


def day_name(table: str, days_from_today: int) -> str:
    day = datetime.now(UTC).date() + timedelta(days=days_from_today)
    return f"{table}_p{day:%Y%m%d}"


async def test_migration_creates_day_partitions_and_rows_land_in_today(
    pg_pool: asyncpg.Pool,
    store_pool: asyncpg.Pool,
) -> None:
    store = EventStore(store_pool)
    interaction = make_interaction()
    feedback = make_feedback(interaction.interaction_id)

    await store.insert_batch([interaction_row(interaction)], [feedback_row(feedback)])
    homes = await pg_pool.fetch(
        "SELECT tableoid::regclass::text AS home FROM interactions"
        " UNION ALL SELECT tableoid::regclass::text FROM feedback"
    )

    for table in ("interactions", "feedback"):
        names = await partitions_of(pg_pool, table)
        assert {day_name(table, ahead) for ahead in range(8)} <= names
        assert {f"{table}_default", f"{table}_history"} <= names
    assert sorted(row["home"] for row in homes) == sorted(
        [day_name("interactions", 0), day_name("feedback", 0)]
    )


async def test_keys_make_inserts_idempotent_across_partitions(
    pg_pool: asyncpg.Pool,
    store_pool: asyncpg.Pool,
) -> None:
    store = EventStore(store_pool)
    first = make_interaction()
    clash = make_interaction(interaction_id=first.interaction_id)
    rating = make_feedback(first.interaction_id)
    rows = [interaction_row(first), interaction_row(first), interaction_row(clash)]

    # A repeat within a batch, a clashing interaction_id, then the whole batch again
    # (the tables' own primary keys include stored_at, so only the keys catch it).
    stored_first = await store.insert_batch(rows, [feedback_row(rating)] * 2)
    stored_again = await store.insert_batch(rows, [feedback_row(rating)])

    assert stored_first.counts == (1, 1)
    assert stored_again.counts == (0, 0)
    assert await event_id_counts(pg_pool, "interactions") == {first.event_id: 1}
    assert await event_id_counts(pg_pool, "feedback") == {rating.event_id: 1}


async def test_retention_drops_expired_partitions_rows_and_keys(
    pg_pool: asyncpg.Pool,
    store_pool: asyncpg.Pool,
) -> None:
    store = EventStore(store_pool)
    interaction = make_interaction()
    await store.insert_batch([interaction_row(interaction)], [])
    later = datetime.now(UTC) + timedelta(days=3)

    kept = await pg_pool.fetchval("SELECT drop_expired_event_data(30, $1)", later)
    rows_after_keep = await count_rows(pg_pool, "interactions")
    dropped = await pg_pool.fetchval("SELECT drop_expired_event_data(1, $1)", later)

    assert (kept, rows_after_keep) == (0, 1)
    # Today's and tomorrow's partitions of both tables are wholly before the cutoff.
    assert dropped == 4
    names = await partitions_of(pg_pool, "interactions")
    assert day_name("interactions", 0) not in names
    assert day_name("interactions", 2) in names
    assert await count_rows(pg_pool, "interactions") == 0
    assert await count_rows(pg_pool, "event_keys") == 0
    assert await count_rows(pg_pool, "interaction_keys") == 0
    assert await store.ensure_partitions(7) == 4  # recreated, empty


async def test_migration_moves_rows_stored_before_it(
    postgres: EmbeddedPostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = PostgresSettings(dsn=postgres.dsn, db_schema=unique_name("s_"))
    every_file = db._migration_files()
    monkeypatch.setattr(db, "_migration_files", lambda: every_file[:1])
    await db.migrate(settings)
    pool = await db.create_pool(settings, jsonb_as="text")
    try:
        old = make_interaction()
        rating = make_feedback(old.interaction_id)
        await _insert_plain(
            pool, old, rating, stored_at=datetime(2024, 1, 2, tzinfo=UTC)
        )
        monkeypatch.setattr(db, "_migration_files", lambda: every_file)

        applied = await db.migrate(settings)
        again = await EventStore(pool).insert_batch(
            [interaction_row(old)], [feedback_row(rating)]
        )
        home = await pool.fetchval("SELECT tableoid::regclass::text FROM interactions")
    finally:
        await pool.close()

    assert applied[0].startswith("0002_")
    assert again.counts == (0, 0)
    assert home == "interactions_history"


async def _insert_plain(
    pool: asyncpg.Pool,
    interaction: Interaction,
    rating: Feedback,
    *,
    stored_at: datetime,
) -> None:
    """Rows as the schema before 0002 held them (no key tables yet)."""
    await pool.execute(
        "INSERT INTO interactions (event_id, interaction_id, project_id, route,"
        " variant, request_messages, latency_s, started_at, finished_at, stored_at)"
        " VALUES ($1, $2, 'demo', 'support-bot', 'baseline', $3, 0.3, $4, $4, $4)",
        interaction.event_id,
        interaction.interaction_id,
        '[{"role": "user", "content": "hi"}]',
        stored_at,
    )
    await pool.execute(
        "INSERT INTO feedback (event_id, interaction_id, project_id, kind, value,"
        " created_at, stored_at) VALUES ($1, $2, 'demo', 'thumbs', 1, $3, $3)",
        rating.event_id,
        rating.interaction_id,
        stored_at,
    )


async def test_collector_stores_once_into_partitioned_tables_under_replay(
    kafka_settings: KafkaSettings,
    pg_settings: PostgresSettings,
    pg_pool: asyncpg.Pool,
    producer: AIOKafkaProducer,  # noqa: F811 (fixture)
) -> None:
    topics = Topics(kafka_settings.topic_prefix)
    interactions = [make_interaction() for _ in range(100)]
    feedback = [make_feedback(item.interaction_id) for item in interactions]
    settings = collector_settings(kafka_settings, pg_settings, retention_days=30)

    # Every event twice: as a producer retrying the whole load would send it.
    await send_load(producer, topics, interactions, feedback)
    await send_load(producer, topics, interactions, feedback)
    app, task = await start_app(settings)
    try:
        await wait_until(
            lambda: app.intake is not None and app.intake.totals["consumed"] >= 400
        )
    finally:
        await stop_app(app, task)

    assert await event_id_counts(pg_pool, "interactions") == {
        item.event_id: 1 for item in interactions
    }
    assert await event_id_counts(pg_pool, "feedback") == {
        item.event_id: 1 for item in feedback
    }
    assert await count_rows(pg_pool, "event_keys") == 200
