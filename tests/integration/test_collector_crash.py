"""Collector processes killed with SIGKILL mid-load: every event is stored exactly once.

Each collector here is a real `python -m services.collector` child process, so a
SIGKILL leaves no chance to finish a batch, commit or leave the group. The embedded
broker makes a killed member's partitions wait out the 10 s session timeout before
they move, which bounds how long these tests take.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer

from services.common.embedded import stop_process
from services.common.events import Feedback, Interaction, encode
from services.common.kafka import Topics
from services.common.settings import KafkaSettings, PostgresSettings
from tests.conftest import REPO_ROOT, unique_name, wait_until
from tests.integration.test_collector import (
    count_rows,
    event_id_counts,
    make_feedback,
    make_interaction,
    producer,  # noqa: F401 (fixture)
    send_all,
)

pytestmark = pytest.mark.integration

LOAD_PAIRS = 3000  # 3000 interactions + 3000 feedback
# Small batches stretch the load over many commits, so a kill lands mid-load.
BATCH_SIZE = 20
STORED_DEADLINE_S = 90.0


class CollectorProcess:
    """One `python -m services.collector` child, its log in a file."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "services.collector"],
                cwd=REPO_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> int:
        stop_process(self.process, grace_s=20)
        return self.process.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def owns_partitions(self) -> bool:
        """Whether its latest assignment log line names at least one partition."""
        lines = [
            line for line in self.log().splitlines() if "partitions assigned" in line
        ]
        return bool(lines) and "partitions=[]" not in lines[-1]

    def alive(self) -> bool:
        return self.process.poll() is None


@pytest.fixture
def collectors() -> Iterator[list[CollectorProcess]]:
    """Starts collectors on demand (append a started one); stops them at the end."""
    started: list[CollectorProcess] = []
    yield started
    for collector in started:
        stop_process(collector.process, grace_s=5)


def collector_env(
    kafka_settings: KafkaSettings, pg_settings: PostgresSettings, group_id: str
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    prefix = "FLYWHEEL_COLLECTOR_"
    env.update(
        {
            f"{prefix}KAFKA__BOOTSTRAP_SERVERS": kafka_settings.bootstrap_servers,
            f"{prefix}KAFKA__TOPIC_PREFIX": kafka_settings.topic_prefix,
            f"{prefix}POSTGRES__DSN": pg_settings.dsn.get_secret_value(),
            f"{prefix}POSTGRES__DB_SCHEMA": pg_settings.db_schema,
            f"{prefix}GROUP_ID": group_id,
            f"{prefix}MAX_BATCH_SIZE": str(BATCH_SIZE),
            f"{prefix}BATCH_TIMEOUT_MS": "100",
            f"{prefix}MIGRATE_ON_START": "false",
            f"{prefix}METRICS_PORT": "0",
            f"{prefix}REPORT_INTERVAL_S": "1",
        }
    )
    return env


def start_collector(
    collectors: list[CollectorProcess], env: dict[str, str], tmp_path: Path
) -> CollectorProcess:
    collector = CollectorProcess(env, tmp_path / f"collector-{len(collectors)}.log")
    collectors.append(collector)
    return collector


def load(count: int) -> tuple[list[Interaction], list[Feedback]]:
    interactions = [make_interaction() for _ in range(count)]
    feedback = [make_feedback(item.interaction_id) for item in interactions]
    return interactions, feedback


async def send_load(
    client: AIOKafkaProducer,
    topics: Topics,
    interactions: list[Interaction],
    feedback: list[Feedback],
) -> None:
    messages: list[tuple[str, bytes | None, bytes | None]] = []
    for interaction, rating in zip(interactions, feedback, strict=True):
        key = str(interaction.interaction_id).encode()
        messages.append((topics.interactions, key, encode(interaction)))
        messages.append((topics.feedback, key, encode(rating)))
    await send_all(client, messages)


async def feed_slowly(
    client: AIOKafkaProducer,
    topics: Topics,
    interactions: list[Interaction],
    feedback: list[Feedback],
    last_part_after: asyncio.Event,
    chunk: int = 50,
) -> None:
    """Send in chunks a tenth of a second apart; the last one once the event is set."""
    starts = list(range(0, len(interactions), chunk))
    for start in starts[:-1]:
        end = start + chunk
        await send_load(client, topics, interactions[start:end], feedback[start:end])
        await asyncio.sleep(0.1)  # pacing the load, not waiting for an outcome
    await last_part_after.wait()
    await send_load(client, topics, interactions[starts[-1] :], feedback[starts[-1] :])


async def start_paced_load(
    client: AIOKafkaProducer,
    topics: Topics,
    interactions: list[Interaction],
    feedback: list[Feedback],
    up_front: int,
    last_part_after: asyncio.Event,
) -> asyncio.Task[None]:
    """Send `up_front` pairs now and feed the rest slowly in a task (await it)."""
    await send_load(client, topics, interactions[:up_front], feedback[:up_front])
    return asyncio.create_task(
        feed_slowly(
            client,
            topics,
            interactions[up_front:],
            feedback[up_front:],
            last_part_after,
        )
    )


async def total_rows(pool: asyncpg.Pool) -> int:
    return await count_rows(pool, "interactions") + await count_rows(pool, "feedback")


async def wait_rows(pool: asyncpg.Pool, count: int, timeout_s: float) -> None:
    async def enough() -> bool:
        return await total_rows(pool) >= count

    await wait_until(enough, timeout_s=timeout_s, interval_s=0.02)


async def assert_stored_exactly_once(
    pool: asyncpg.Pool, interactions: list[Interaction], feedback: list[Feedback]
) -> None:
    assert await event_id_counts(pool, "interactions") == {
        item.event_id: 1 for item in interactions
    }
    assert await event_id_counts(pool, "feedback") == {
        item.event_id: 1 for item in feedback
    }


async def test_collector_killed_mid_load_and_restarted_stores_every_event_once(
    kafka_settings: KafkaSettings,
    pg_settings: PostgresSettings,
    pg_pool: asyncpg.Pool,
    producer: AIOKafkaProducer,  # noqa: F811 (fixture)
    collectors: list[CollectorProcess],
    tmp_path: Path,
) -> None:
    topics = Topics(kafka_settings.topic_prefix)
    interactions, feedback = load(LOAD_PAIRS)
    total = 2 * LOAD_PAIRS
    env = collector_env(kafka_settings, pg_settings, unique_name("collector-"))

    # The last part of the load arrives only after the kill, so it lands mid-load
    # however fast the collector drains what came before.
    killed = asyncio.Event()
    feeder = await start_paced_load(
        producer, topics, interactions, feedback, LOAD_PAIRS // 2, killed
    )
    first = start_collector(collectors, env, tmp_path)
    await wait_rows(pg_pool, total // 5, timeout_s=60)
    first.kill()
    stored_at_kill = await total_rows(pg_pool)
    killed.set()
    await feeder
    second = start_collector(collectors, env, tmp_path)
    await wait_rows(pg_pool, total, timeout_s=STORED_DEADLINE_S)
    exit_code = second.stop()

    assert first.process.returncode == -signal.SIGKILL
    assert stored_at_kill < total, "the kill must land mid-load"
    await assert_stored_exactly_once(pg_pool, interactions, feedback)
    assert exit_code == 0, second.log()[-2000:]


async def test_collector_killed_during_rebalance_stores_every_event_once(
    kafka_settings: KafkaSettings,
    pg_settings: PostgresSettings,
    pg_pool: asyncpg.Pool,
    producer: AIOKafkaProducer,  # noqa: F811 (fixture)
    collectors: list[CollectorProcess],
    tmp_path: Path,
) -> None:
    topics = Topics(kafka_settings.topic_prefix)
    interactions, feedback = load(LOAD_PAIRS)
    total = 2 * LOAD_PAIRS
    env = collector_env(kafka_settings, pg_settings, unique_name("collector-"))

    # The load keeps arriving while the group changes, and its last part only
    # after the kill: a collector is fast enough to drain a load sent up front
    # before the second member has even joined.
    killed = asyncio.Event()
    feeder = await start_paced_load(
        producer, topics, interactions, feedback, LOAD_PAIRS // 3, killed
    )
    first = start_collector(collectors, env, tmp_path)
    await wait_rows(pg_pool, total // 10, timeout_s=60)
    # A second member joins mid-load: the group rebalances under load.
    second = start_collector(collectors, env, tmp_path)
    await wait_until(second.owns_partitions, timeout_s=60)
    stored_at_join = await total_rows(pg_pool)
    # Once both hold partitions, the first dies without committing its batch.
    first.kill()
    stored_at_kill = await total_rows(pg_pool)
    killed.set()
    await feeder
    await wait_rows(pg_pool, total, timeout_s=STORED_DEADLINE_S)
    exit_code = second.stop()

    assert stored_at_join < total and stored_at_kill < total, "kill lands mid-load"
    assert first.process.returncode == -signal.SIGKILL
    await assert_stored_exactly_once(pg_pool, interactions, feedback)
    assert exit_code == 0, second.log()[-2000:]
