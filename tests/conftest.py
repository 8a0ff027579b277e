"""Session-wide real infrastructure: one Tansu broker and one PostgreSQL per test run.

Each test that asks for `kafka_settings` gets a fresh topic set (a unique prefix),
and each that asks for `pg_settings` a fresh, migrated schema.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from services.common import db, kafka
from services.common.embedded import EmbeddedBroker, EmbeddedPostgres, free_port
from services.common.settings import KafkaSettings, PostgresSettings


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    server = EmbeddedBroker(tmp_path_factory.mktemp("kafka"), port=free_port())
    server.start()
    yield server
    server.stop()


@contextlib.contextmanager
def server_data_dir(name: str) -> Iterator[Path]:
    """A folder for a server's data outside pytest's temporary root.

    PostgreSQL runs as another system user when the tests run as root, and pytest
    makes its temporary root private (mode 0700) whenever a session starts, which
    would cut a running server off from its own files.
    """
    folder = Path(tempfile.mkdtemp(prefix=f"flywheel-{name}-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[EmbeddedPostgres]:
    with server_data_dir("postgres") as folder:
        server = EmbeddedPostgres(folder, port=free_port())
        server.start()
        yield server
        server.stop()


def unique_name(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def kafka_settings(broker: EmbeddedBroker) -> KafkaSettings:
    settings = KafkaSettings(
        bootstrap_servers=broker.bootstrap_servers,
        topic_prefix=f"{unique_name('t')}.",
        partitions=4,
    )
    await kafka.wait_for_broker(settings)
    await kafka.ensure_topics(settings, kafka.Topics(settings.topic_prefix).all())
    return settings


@pytest.fixture
async def pg_settings(postgres: EmbeddedPostgres) -> PostgresSettings:
    settings = PostgresSettings(dsn=postgres.dsn, db_schema=unique_name("s_"))
    await db.migrate(settings)
    return settings


@pytest.fixture
async def pg_pool(pg_settings: PostgresSettings) -> AsyncIterator[Any]:
    pool = await db.create_pool(pg_settings)
    yield pool
    await pool.close()


@pytest.fixture
async def store_pool(pg_settings: PostgresSettings) -> AsyncIterator[Any]:
    """A pool as the collector's store uses it: jsonb as JSON text."""
    pool = await db.create_pool(pg_settings, jsonb_as="text")
    yield pool
    await pool.close()


async def wait_until(
    condition: Callable[[], Any], *, timeout_s: float = 30.0, interval_s: float = 0.1
) -> Any:
    """Poll `condition` (sync or async) until it is truthy or time runs out."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(interval_s)


REPO_ROOT = Path(__file__).resolve().parent.parent
