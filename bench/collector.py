"""Collector throughput: events per second from topic to committed rows.

`python -m bench.collector [--events N] [--rounds R]` starts its own embedded broker
and PostgreSQL, produces N events once (half interactions, half feedback) and times,
on those same events, in each round:

- the collector (the real `App`, default settings): from its partitions being
  assigned until every event is stored and its offsets committed;
- limit 1, consuming without storing: a consumer in the same configuration reads and
  commits every batch, no validation, no PostgreSQL;
- limit 2, COPYing the same rows (those the collector commits: every event's key in
  `event_keys`, every interaction's in `interaction_keys`, and the event rows)
  straight into fresh tables, one COPY per table in one transaction;
- for reference, COPYing the event rows alone (the key tables are the price of
  exactly-once storage in tables partitioned by time).

It prints the median of each and the collector's ratio to each. The goal is at least
half of the smaller limit.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg

from services.collector.app import YOUNG_GC_THRESHOLD, App
from services.collector.handlers import (
    FEEDBACK_COLUMNS,
    INTERACTION_COLUMNS,
    feedback_row,
    interaction_row,
)
from services.collector.settings import CollectorSettings
from services.collector.store import EVENT_KEY_COLUMNS, Source, key_rows
from services.common import db, kafka, lifecycle
from services.common.embedded import EmbeddedBroker, EmbeddedPostgres, free_port
from services.common.events import Feedback, Interaction, encode, utc_now
from services.common.settings import KafkaSettings, PostgresSettings

ASSIGN_POLL_S = 0.001
DONE_TIMEOUT_S = 300.0


def make_events(pairs: int) -> tuple[list[Interaction], list[Feedback]]:
    """`pairs` interactions, each with one thumbs-up feedback."""
    now = utc_now()
    interactions = [
        Interaction(
            project_id="bench",
            route="support-bot",
            variant="baseline",
            request_messages=[{"role": "user", "content": f"Question number {n}?"}],
            response_text="An answer of a few words.",
            latency_s=0.3,
            started_at=now,
            finished_at=now,
        )
        for n in range(pairs)
    ]
    feedback = [
        Feedback(
            interaction_id=item.interaction_id,
            project_id="bench",
            kind="thumbs",
            value=1,
        )
        for item in interactions
    ]
    return interactions, feedback


async def produce(
    settings: KafkaSettings, interactions: list[Interaction], feedback: list[Feedback]
) -> list[Source]:
    """Produce every pair; where each event landed (interactions, then feedback)."""
    topics = kafka.Topics(settings.topic_prefix)
    producer = kafka.make_producer(settings, client_id="bench-producer")
    await producer.start()
    try:
        pending = []
        for interaction, rating in zip(interactions, feedback, strict=True):
            key = str(interaction.interaction_id).encode()
            pending.append(
                await producer.send(topics.interactions, encode(interaction), key=key)
            )
            pending.append(
                await producer.send(topics.feedback, encode(rating), key=key)
            )
        landed = await asyncio.gather(*pending)
    finally:
        await producer.stop()
    sources = [(item.topic, item.partition, item.offset) for item in landed]
    return sources[0::2] + sources[1::2]


async def wait_for(condition: Callable[[], bool], *, timeout_s: float) -> float:
    """Poll until `condition()` holds; the monotonic time it was first seen true."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"benchmark condition not met within {timeout_s:.0f} s")
        await asyncio.sleep(ASSIGN_POLL_S)
    return time.monotonic()


def all_partitions(settings: KafkaSettings) -> int:
    return 2 * settings.partitions  # interactions and feedback


async def time_collector(
    kafka_settings: KafkaSettings, pg_settings: PostgresSettings, total: int, tag: str
) -> float:
    """Seconds from assignment to every event stored and committed, by the real App."""
    await db.migrate(pg_settings)
    settings = CollectorSettings(
        kafka=kafka_settings,
        postgres=pg_settings,
        group_id=f"bench-collector-{tag}",
        migrate_on_start=False,
        metrics_port=0,
    )
    app = App(settings)
    task = asyncio.create_task(app.run())
    try:

        def assigned() -> bool:
            intake = app.intake
            return intake is not None and len(
                intake._consumer.assignment()
            ) == all_partitions(kafka_settings)

        started = await wait_for(assigned, timeout_s=60)
        assert app.intake is not None
        intake = app.intake
        finished = await wait_for(
            lambda: intake.totals["consumed"] >= total, timeout_s=DONE_TIMEOUT_S
        )
    finally:
        app.stop()
        await asyncio.wait_for(task, 60)
    stored = intake.totals["stored"]
    if stored != total:
        raise RuntimeError(f"collector stored {stored} of {total} events")
    return finished - started


async def time_consume_only(
    kafka_settings: KafkaSettings, total: int, tag: str
) -> float:
    """Seconds from assignment to every event read and its offsets committed."""
    topics = kafka.Topics(kafka_settings.topic_prefix)
    batch_size = CollectorSettings().max_batch_size
    consumer = kafka.make_consumer(
        kafka_settings,
        topics.interactions,
        topics.feedback,
        group_id=f"bench-consume-{tag}",
        client_id="bench-consume",
    )
    await consumer.start()
    try:
        seen = 0
        started = 0.0
        while seen < total:
            batch = await consumer.getmany(timeout_ms=500, max_records=batch_size)
            if not started and len(consumer.assignment()) == all_partitions(
                kafka_settings
            ):
                started = time.monotonic()
            if batch:
                seen += sum(len(records) for records in batch.values())
                await consumer.commit(
                    {tp: records[-1].offset + 1 for tp, records in batch.items()}
                )
        return time.monotonic() - started
    finally:
        await consumer.stop()


async def time_copy(
    postgres: EmbeddedPostgres,
    pg_settings: PostgresSettings,
    interactions: list[Interaction],
    feedback: list[Feedback],
    sources: list[Source],
    *,
    with_keys: bool = True,
) -> float:
    """Seconds to build the rows and COPY them into fresh tables, one COPY each.

    The rows are those the collector commits for these events: their keys (every
    event_id in `event_keys` with the record it came from, `sources`, every
    interaction_id in `interaction_keys`) and the events themselves;
    `with_keys=False` COPYs the event rows alone.
    """
    await db.migrate(pg_settings)
    # A plain connection: jsonb travels as the JSON text the row builders make.
    connection = await asyncpg.connect(
        postgres.dsn, server_settings={"search_path": pg_settings.db_schema}
    )
    try:
        started = time.monotonic()
        interaction_rows = [interaction_row(item) for item in interactions]
        feedback_rows = [feedback_row(item) for item in feedback]
        tables = [
            ("interactions", INTERACTION_COLUMNS, interaction_rows),
            ("feedback", FEEDBACK_COLUMNS, feedback_rows),
        ]
        if with_keys:
            event_keys, interaction_keys = key_rows(
                interaction_rows,
                feedback_rows,
                (sources[: len(interactions)], sources[len(interactions) :]),
            )
            tables = [
                ("event_keys", EVENT_KEY_COLUMNS, event_keys),
                ("interaction_keys", ("interaction_id",), interaction_keys),
                *tables,
            ]
        async with connection.transaction():
            for table, columns, rows in tables:
                await connection.copy_records_to_table(
                    table, records=rows, columns=list(columns)
                )
        return time.monotonic() - started
    finally:
        await connection.close()


async def run(pairs: int, rounds: int, data_dir: Path) -> dict[str, list[float]]:
    broker = EmbeddedBroker(data_dir / "kafka", port=free_port())
    postgres = EmbeddedPostgres(data_dir / "postgres", port=free_port())
    broker.start()
    postgres.start()
    try:
        kafka_settings = KafkaSettings(
            bootstrap_servers=broker.bootstrap_servers, topic_prefix="bench."
        )
        await kafka.wait_for_broker(kafka_settings)
        await kafka.ensure_topics(
            kafka_settings, kafka.Topics(kafka_settings.topic_prefix).all()
        )
        interactions, feedback = make_events(pairs)
        sources = await produce(kafka_settings, interactions, feedback)
        # Every measure runs under the collector's garbage collector settings (its
        # App sets them process-wide when it starts, so later rounds would anyway).
        lifecycle.settle_heap(young_threshold=YOUNG_GC_THRESHOLD)
        total = 2 * pairs
        seconds: dict[str, list[float]] = {
            "consume": [],
            "copy": [],
            "copy_events": [],
            "collector": [],
        }
        for round_no in range(rounds):
            tag = str(round_no)
            schema = PostgresSettings(dsn=postgres.dsn, db_schema=f"bench_copy_{tag}")
            seconds["consume"].append(
                await time_consume_only(kafka_settings, total, tag)
            )
            seconds["copy"].append(
                await time_copy(postgres, schema, interactions, feedback, sources)
            )
            schema = PostgresSettings(dsn=postgres.dsn, db_schema=f"bench_rows_{tag}")
            seconds["copy_events"].append(
                await time_copy(
                    postgres, schema, interactions, feedback, sources, with_keys=False
                )
            )
            schema = PostgresSettings(
                dsn=postgres.dsn, db_schema=f"bench_collector_{tag}"
            )
            seconds["collector"].append(
                await time_collector(kafka_settings, schema, total, tag)
            )
        return seconds
    finally:
        broker.stop()
        postgres.stop()


def report(seconds: dict[str, list[float]], total: int) -> str:
    rate = {name: total / statistics.median(values) for name, values in seconds.items()}
    smaller = min(rate["consume"], rate["copy"])
    rows = [
        ("consume without storing (limit)", "consume"),
        ("COPY the same rows into PostgreSQL: keys and events (limit)", "copy"),
        ("COPY the event rows alone (for reference)", "copy_events"),
        ("collector: topic to committed rows", "collector"),
    ]
    lines = [
        f"{total} events ({total // 2} interactions + {total // 2} feedback), "
        f"median of {len(seconds['collector'])} rounds",
        "",
        "| measure | median s | events/s | collector / this |",
        "| --- | ---: | ---: | ---: |",
    ]
    for label, name in rows:
        ratio = rate["collector"] / rate[name]
        lines.append(
            f"| {label} | {statistics.median(seconds[name]):.3f} "
            f"| {rate[name]:,.0f} | {ratio:.2f} |"
        )
    goal = rate["collector"] / smaller
    verdict = "met" if goal >= 0.5 else "NOT met"
    lines += ["", f"goal (at least 0.5 of the smaller limit): {goal:.2f}, {verdict}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else ""
    )
    parser.add_argument("--events", type=int, default=20_000, help="events in total")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    pairs = max(args.events // 2, 1)
    with tempfile.TemporaryDirectory(prefix="flywheel-bench-") as folder:
        # The loop the collector runs on in production (uvloop when installed).
        seconds = lifecycle.run(run(pairs, args.rounds, Path(folder)))
    print(report(seconds, 2 * pairs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
