"""Helpers that write interactions and feedback rows the way the collector does."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

NOW = datetime.now(UTC)


async def add_interaction(
    pool: Any,
    route: str,
    prompt: str,
    answer: str,
    *,
    error: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
    at: datetime | None = None,
) -> uuid.UUID:
    interaction_id = uuid.uuid4()
    finished = at or NOW - timedelta(minutes=5)
    await pool.execute(
        "INSERT INTO interactions (event_id, interaction_id, project_id, route,"
        " variant, request_messages, response_text, error, latency_s, metadata,"
        " started_at, finished_at) VALUES ($1, $2, 'default', $3, 'v1', $4, $5, $6,"
        " 0.1, $7, $8, $8)",
        uuid.uuid4(),
        interaction_id,
        route,
        [{"role": "user", "content": prompt}],
        answer,
        error,
        metadata or {},
        finished,
    )
    return interaction_id


async def add_feedback(
    pool: Any,
    interaction_id: uuid.UUID,
    kind: str,
    value: float | None = None,
    text: str | None = None,
    project_id: str = "default",
) -> uuid.UUID:
    event_id = uuid.uuid4()
    await pool.execute(
        "INSERT INTO feedback (event_id, interaction_id, project_id, kind, value,"
        " text, created_at) VALUES ($1, $2, $6, $3, $4, $5, now())",
        event_id,
        interaction_id,
        kind,
        value,
        text,
        project_id,
    )
    return event_id


async def rated(pool: Any, route: str, prompt: str, answer: str, value: float) -> Any:
    """An interaction with one thumbs rating; (interaction id, feedback id)."""
    interaction_id = await add_interaction(pool, route, prompt, answer)
    return interaction_id, await add_feedback(pool, interaction_id, "thumbs", value)
