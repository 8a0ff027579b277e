"""PostgreSQL helpers: a connection pool bound to Flywheel's schema, and migrations."""

from __future__ import annotations

import hashlib
import logging
from importlib import resources
from typing import Literal

import asyncpg
import orjson

from services.common.settings import PostgresSettings

logger = logging.getLogger(__name__)

MIGRATIONS_PACKAGE = "services.common.migrations"


async def _init_connection(connection: asyncpg.Connection) -> None:
    # jsonb columns read and write Python objects, encoded with orjson.
    await connection.set_type_codec(
        "jsonb",
        encoder=lambda value: orjson.dumps(value).decode(),
        decoder=orjson.loads,
        schema="pg_catalog",
    )


JsonbAs = Literal["objects", "text"]


async def create_pool(
    settings: PostgresSettings,
    *,
    jsonb_as: JsonbAs = "objects",
    reset_sessions: bool = True,
) -> asyncpg.Pool:
    """A pool whose connections see only the configured schema (search_path).

    jsonb values are Python objects (encoded with orjson), or with
    `jsonb_as="text"` JSON text passed through unparsed (asyncpg's own codec, which
    COPY's binary format can use too).

    A released connection's session is reset (settings, listeners, advisory
    locks: one round trip) unless `reset_sessions` is False, for a service whose
    code changes none of them; an open transaction is rolled back either way.
    """
    pool = await asyncpg.create_pool(
        settings.dsn.get_secret_value(),
        min_size=settings.pool_min_size,
        max_size=settings.pool_max_size,
        command_timeout=settings.command_timeout_s,
        server_settings={"search_path": settings.db_schema},
        init=_init_connection if jsonb_as == "objects" else None,
        reset=None if reset_sessions else _keep_session,
    )
    assert pool is not None  # create_pool returns None only when awaited lazily
    return pool


async def _keep_session(connection: asyncpg.Connection) -> None:
    """A pool's reset that leaves the session as it is (see create_pool)."""


def _migration_files() -> list[tuple[str, str]]:
    folder = resources.files(MIGRATIONS_PACKAGE)
    files = sorted(
        (entry.name, entry.read_text())
        for entry in folder.iterdir()
        if entry.name.endswith(".sql")
    )
    return files


async def migrate(settings: PostgresSettings) -> list[str]:
    """Apply the migrations not applied yet, in order, each in its own transaction.

    Idempotent, and safe to run from several processes at once: an advisory lock
    serializes runners. Returns the names applied now.
    """
    connection = await asyncpg.connect(settings.dsn.get_secret_value())
    applied_now: list[str] = []
    try:
        schema = settings.db_schema
        await connection.execute("SELECT pg_advisory_lock(hashtext($1))", schema)
        try:
            await connection.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            await connection.execute(f'SET search_path TO "{schema}"')
            await connection.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " name text PRIMARY KEY, sha256 text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {
                row["name"]: row["sha256"]
                for row in await connection.fetch(
                    "SELECT name, sha256 FROM schema_migrations"
                )
            }
            for name, sql in _migration_files():
                digest = hashlib.sha256(sql.encode()).hexdigest()
                if name in done:
                    if done[name] != digest:
                        logger.warning(
                            "migration changed after it was applied name=%s", name
                        )
                    continue
                async with connection.transaction():
                    await connection.execute(sql)
                    await connection.execute(
                        "INSERT INTO schema_migrations (name, sha256) VALUES ($1, $2)",
                        name,
                        digest,
                    )
                applied_now.append(name)
        finally:
            await connection.execute("SELECT pg_advisory_unlock(hashtext($1))", schema)
    finally:
        await connection.close()
    if applied_now:
        logger.info(
            "migrations applied schema=%s names=%s", settings.db_schema, applied_now
        )
    return applied_now
