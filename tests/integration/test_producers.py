"""Producers in other languages and clients write events the collector stores.

Each test builds the events as plain JSON (no Flywheel model), hands them to a
non-aiokafka producer, runs the collector in-process and checks the rows. It also
checks the records landed on the partition Kafka's Java client (murmur2) would pick
for the key, which is what keeps interactions and feedback co-partitioned.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from aiokafka.partitioner import murmur2

from services.common.kafka import Topics
from services.common.settings import KafkaSettings, PostgresSettings
from tests.conftest import REPO_ROOT, wait_until
from tests.integration.test_collector import (
    collector_settings,
    event_id_counts,
    start_app,
    stop_app,
)

pytestmark = pytest.mark.integration

NODE_CLIENT = REPO_ROOT / "clients" / "node"
NODE_TIMEOUT_S = 60.0


def interaction_json(interaction_id: str) -> dict[str, Any]:
    now = datetime.now(UTC).isoformat()
    return {
        "schema_version": 1,
        "event_id": str(uuid.uuid4()),
        "interaction_id": interaction_id,
        "project_id": "polyglot",
        "route": "support-bot",
        "variant": "baseline",
        "request_messages": [{"role": "user", "content": "Wie spät ist es? ✓"}],
        "response_text": "Zeit für Tee.",
        "latency_s": 0.25,
        "started_at": now,
        "finished_at": now,
    }


def feedback_json(interaction_id: str) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "event_id": str(uuid.uuid4()),
        "interaction_id": interaction_id,
        "project_id": "polyglot",
        "kind": "thumbs",
        "value": 1,
        "created_at": datetime.now(UTC).isoformat(),
    }


def java_partition(key: str, partitions: int) -> int:
    """The partition Kafka's Java client (and aiokafka, kafkajs) picks for a key."""
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


async def stored_ids(pool: asyncpg.Pool, table: str) -> set[str]:
    return {str(event_id) for event_id in await event_id_counts(pool, table)}


async def collect_until_stored(
    kafka_settings: KafkaSettings,
    pg_settings: PostgresSettings,
    pg_pool: asyncpg.Pool,
    expected: dict[str, list[dict[str, Any]]],
) -> None:
    """Run the collector until every expected event_id is in its table."""
    app, task = await start_app(collector_settings(kafka_settings, pg_settings))
    try:
        for table, events in expected.items():
            wanted = {event["event_id"] for event in events}
            await wait_until(
                lambda t=table, w=wanted: _holds(pg_pool, t, w), timeout_s=60
            )
    finally:
        await stop_app(app, task)


async def _holds(pool: asyncpg.Pool, table: str, wanted: set[str]) -> bool:
    return wanted <= await stored_ids(pool, table)


async def run_node_producer(
    kafka_settings: KafkaSettings, topic: str, events: list[dict[str, Any]]
) -> dict[str, Any]:
    """Pipe events as JSON lines through clients/node/produce.js; its summary."""
    node = shutil.which("node")
    assert node is not None
    lines = "".join(json.dumps(event, ensure_ascii=False) + "\n" for event in events)
    process = await asyncio.create_subprocess_exec(
        node,
        str(NODE_CLIENT / "produce.js"),
        "--brokers",
        kafka_settings.bootstrap_servers,
        "--topic",
        topic,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(NODE_TIMEOUT_S):
            out, err = await process.communicate(lines.encode())
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode == 0, err.decode(errors="replace")
    summary: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return summary


def node_skip_reason() -> str | None:
    if shutil.which("node") is None:
        return "Node.js (`node`) is not installed on this machine"
    if not (NODE_CLIENT / "node_modules" / "kafkajs").is_dir():
        return "kafkajs is not installed: run `npm ci --prefix clients/node`"
    return None


@pytest.mark.skipif(node_skip_reason() is not None, reason=str(node_skip_reason()))
async def test_kafkajs_producer_events_are_stored(
    kafka_settings: KafkaSettings,
    pg_settings: PostgresSettings,
    pg_pool: asyncpg.Pool,
) -> None:
    topics = Topics(kafka_settings.topic_prefix)
    ids = [str(uuid.uuid4()) for _ in range(40)]
    interactions = [interaction_json(item) for item in ids]
    feedback = [feedback_json(item) for item in ids]

    sent_interactions = await run_node_producer(
        kafka_settings, topics.interactions, interactions
    )
    sent_feedback = await run_node_producer(kafka_settings, topics.feedback, feedback)
    await collect_until_stored(
        kafka_settings,
        pg_settings,
        pg_pool,
        {"interactions": interactions, "feedback": feedback},
    )

    assert sent_interactions["sent"] == sent_feedback["sent"] == len(ids)
    assert await stored_ids(pg_pool, "interactions") == {
        e["event_id"] for e in interactions
    }
    assert await stored_ids(pg_pool, "feedback") == {e["event_id"] for e in feedback}
    rows = await pg_pool.fetch(
        "SELECT i.interaction_id, i.request_messages, f.value FROM interactions i"
        " JOIN feedback f USING (interaction_id)"
    )
    assert len(rows) == len(ids)
    assert rows[0]["request_messages"][0]["content"] == "Wie spät ist es? ✓"


async def test_confluent_kafka_producer_events_are_stored(
    kafka_settings: KafkaSettings,
    pg_settings: PostgresSettings,
    pg_pool: asyncpg.Pool,
) -> None:
    confluent_kafka = pytest.importorskip(
        "confluent_kafka", reason="confluent-kafka is not installed (pip package)"
    )
    topics = Topics(kafka_settings.topic_prefix)
    ids = [str(uuid.uuid4()) for _ in range(40)]
    interactions = [interaction_json(item) for item in ids]
    feedback = [feedback_json(item) for item in ids]
    producer = confluent_kafka.Producer(
        {
            "bootstrap.servers": kafka_settings.bootstrap_servers,
            "acks": "all",
            # librdkafka hashes keys with CRC32 by default; murmur2 matches Java's
            # client, so this producer's events co-partition with everyone else's.
            "partitioner": "murmur2_random",
            "enable.idempotence": False,
        }
    )
    placed: list[tuple[str, int]] = []
    failures: list[str] = []

    def on_delivery(error: Any, message: Any) -> None:
        if error is not None:
            failures.append(str(error))
        else:
            placed.append((message.key().decode(), message.partition()))

    for topic, events in (
        (topics.interactions, interactions),
        (topics.feedback, feedback),
    ):
        for event in events:
            producer.produce(
                topic,
                json.dumps(event).encode(),
                key=event["interaction_id"].encode(),
                on_delivery=on_delivery,
            )
    remaining = await asyncio.to_thread(producer.flush, 30)
    await collect_until_stored(
        kafka_settings,
        pg_settings,
        pg_pool,
        {"interactions": interactions, "feedback": feedback},
    )

    assert (remaining, failures, len(placed)) == (0, [], 2 * len(ids))
    partitions = kafka_settings.partitions
    assert all(p == java_partition(key, partitions) for key, p in placed)
    assert await stored_ids(pg_pool, "interactions") == {
        e["event_id"] for e in interactions
    }
    assert await stored_ids(pg_pool, "feedback") == {e["event_id"] for e in feedback}
