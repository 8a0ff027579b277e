"""Orphan feedback is stored and visible: the gauge and the documented query."""

from __future__ import annotations

import uuid

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer

from services.collector import metrics
from services.common.events import encode
from services.common.kafka import Topics
from services.common.settings import KafkaSettings, PostgresSettings
from tests.conftest import REPO_ROOT, wait_until
from tests.integration.test_collector import (
    collector_settings,
    count_rows,
    make_feedback,
    make_interaction,
    producer,  # noqa: F401 (fixture)
    send_all,
    start_app,
    stop_app,
)

pytestmark = pytest.mark.integration

QUERY_MARK = "<!-- orphan-query:"


def documented_orphan_query() -> str:
    """The SQL block that follows the orphan-query mark in docs/events.md."""
    text = (REPO_ROOT / "docs" / "events.md").read_text()
    after_mark = text.split(QUERY_MARK, 1)[1]
    block = after_mark.split("```sql", 1)[1].split("```", 1)[0]
    return block.strip()


async def test_orphan_feedback_is_stored_counted_and_listed_by_the_documented_query(
    kafka_settings: KafkaSettings,
    pg_settings: PostgresSettings,
    pg_pool: asyncpg.Pool,
    producer: AIOKafkaProducer,  # noqa: F811 (fixture)
) -> None:
    topics = Topics(kafka_settings.topic_prefix)
    interaction = make_interaction()
    matched = make_feedback(interaction.interaction_id)
    orphans = [make_feedback(uuid.uuid4(), kind="copy") for _ in range(2)]
    messages = [
        (topics.feedback, str(event.interaction_id).encode(), encode(event))
        for event in [matched, *orphans]
    ]
    messages.append(
        (
            topics.interactions,
            str(interaction.interaction_id).encode(),
            encode(interaction),
        )
    )
    settings = collector_settings(kafka_settings, pg_settings)

    await send_all(producer, messages)
    app, task = await start_app(settings)
    try:
        await wait_until(lambda: _rows_at_least(pg_pool, feedback=3, interactions=1))
        await wait_until(lambda: metrics.ORPHAN_FEEDBACK._value.get() == 2)
    finally:
        await stop_app(app, task)
    listed = await pg_pool.fetch(documented_orphan_query())

    assert {row["event_id"] for row in listed} == {event.event_id for event in orphans}
    assert {row["kind"] for row in listed} == {"copy"}


async def _rows_at_least(
    pool: asyncpg.Pool, *, feedback: int, interactions: int
) -> bool:
    return (
        await count_rows(pool, "feedback") >= feedback
        and await count_rows(pool, "interactions") >= interactions
    )
