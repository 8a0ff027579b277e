"""Training runs in PostgreSQL: what the scheduler tried, and where its window is.

The window (the time up to which signals were used) advances only past runs that
are finished with: succeeded (whatever staging said), skipped for too few rows, or
abandoned after every attempt failed. A failed run leaves the window where it was,
so the next attempt trains on the same signals.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import asyncpg

FINISHED_STATES = ("succeeded", "skipped", "abandoned")


async def window_end(pool: asyncpg.Pool, route: str) -> datetime | None:
    """The end of the last finished run's window (None before the first)."""
    value = await pool.fetchval(
        "SELECT max(window_end) FROM training_runs"
        " WHERE route = $1 AND state = ANY($2::text[])",
        route,
        list(FINISHED_STATES),
    )
    return value  # type: ignore[no-any-return]


async def failed_attempts(pool: asyncpg.Pool, route: str) -> int:
    """Failed runs since the last finished one (the current streak)."""
    value = await pool.fetchval(
        "SELECT count(*) FROM training_runs WHERE route = $1 AND state = 'failed'"
        " AND started_at > coalesce((SELECT max(started_at) FROM training_runs"
        "  WHERE route = $1 AND state = ANY($2::text[])), '-infinity')",
        route,
        list(FINISHED_STATES),
    )
    return int(value)


async def start_run(
    pool: asyncpg.Pool, route: str, window: datetime, attempt: int
) -> str:
    run_id = f"run-{uuid.uuid4().hex[:10]}"
    await pool.execute(
        "INSERT INTO training_runs (run_id, route, window_end, attempt, state)"
        " VALUES ($1, $2, $3, $4, 'running')",
        run_id,
        route,
        window,
        attempt,
    )
    return run_id


async def finish_run(
    pool: asyncpg.Pool,
    run_id: str,
    state: str,
    *,
    dataset_id: str | None = None,
    version_id: str | None = None,
    outcome: str | None = None,
    error: str | None = None,
    timings: dict[str, Any] | None = None,
) -> None:
    await pool.execute(
        "UPDATE training_runs SET state = $2, dataset_id = $3, version_id = $4,"
        " outcome = $5, error = $6, timings = $7, finished_at = now()"
        " WHERE run_id = $1",
        run_id,
        state,
        dataset_id,
        version_id,
        outcome,
        error,
        timings or {},
    )


async def history(pool: asyncpg.Pool, route: str) -> list[dict[str, Any]]:
    rows = await pool.fetch(
        "SELECT * FROM training_runs WHERE route = $1 ORDER BY started_at", route
    )
    return [dict(row) for row in rows]
