"""Dependencies checked for readiness; PostgreSQL also waited for at start-up.

A service that cannot reach PostgreSQL when it starts keeps retrying with backoff and
reports why on /readyz, instead of exiting and being restarted in a loop; a wrong
password or a broken migration still fails start-up at once (misuse, not an outage).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import asyncpg
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import KafkaError

from services.common import db
from services.common.settings import KafkaSettings, PostgresSettings

logger = logging.getLogger(__name__)

# What "PostgreSQL is not there (yet)" looks like: refused or dropped connections,
# timeouts, a server still starting, every connection slot taken.
UNREACHABLE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
)


class PostgresLink:
    """The service's pool once connected, and why not while it is not."""

    def __init__(
        self,
        settings: PostgresSettings,
        *,
        jsonb_as: db.JsonbAs = "objects",
        reset_sessions: bool = True,
    ) -> None:
        self.settings = settings
        self.jsonb_as = jsonb_as
        self.reset_sessions = reset_sessions
        self.pool: asyncpg.Pool | None = None
        self.last_error: str | None = None

    async def connect(
        self,
        stop: asyncio.Event,
        *,
        migrate: bool,
        on_attempt: Callable[[], None] = lambda: None,
        min_delay_s: float = 0.5,
        max_delay_s: float = 10.0,
    ) -> asyncpg.Pool | None:
        """Migrate (optionally) and open the pool, retrying while unreachable.

        Returns None when `stop` is set first. `on_attempt` runs before each attempt
        (a liveness heartbeat: waiting on PostgreSQL is not being stuck).
        """
        delay_s = min_delay_s
        while not stop.is_set():
            on_attempt()
            try:
                if migrate:
                    await db.migrate(self.settings)
                self.pool = await db.create_pool(
                    self.settings,
                    jsonb_as=self.jsonb_as,
                    reset_sessions=self.reset_sessions,
                )
                self.last_error = None
                return self.pool
            except UNREACHABLE as error:
                self.last_error = repr(error)
            logger.warning(
                "PostgreSQL unreachable, retrying in %.1f s: %s",
                delay_s,
                self.last_error,
            )
            try:
                async with asyncio.timeout(delay_s):
                    await stop.wait()
            except TimeoutError:
                delay_s = min(delay_s * 2, max_delay_s)
        return None

    async def problems(self) -> list[str]:
        """Readiness: the pool exists and PostgreSQL answers `SELECT 1`."""
        if self.pool is None:
            return [f"not connected yet ({self.last_error or 'connecting'})"]
        try:
            async with self.pool.acquire() as connection:
                await connection.fetchval("SELECT 1")
        except (*UNREACHABLE, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
            return [f"SELECT 1 failed: {error!r}"]
        return []

    async def close(self) -> None:
        """Close the pool, if one was opened; idempotent."""
        pool, self.pool = self.pool, None
        if pool is not None:
            await pool.close()


async def kafka_problems(settings: KafkaSettings, *, client_id: str) -> list[str]:
    """Readiness: a bootstrap server answers a metadata request.

    A short-lived client each time: the caller caches the answer, so this is one
    connection per probe period, not per probe.
    """
    client = AIOKafkaClient(**settings.client_options(), client_id=client_id)
    try:
        await client.bootstrap()
    except KafkaError as error:
        return [f"no broker answered at {settings.bootstrap_servers}: {error!r}"]
    finally:
        await client.close()
    return []
