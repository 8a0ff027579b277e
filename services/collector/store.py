"""PostgreSQL adapter: idempotent batch inserts of interactions and feedback.

Orphan feedback (feedback whose interaction is not stored, e.g. it arrived first or
the interaction never came) is found with:

    SELECT f.*
    FROM feedback AS f
    WHERE NOT EXISTS (
        SELECT 1 FROM interactions AS i WHERE i.interaction_id = f.interaction_id
    );

The gauge refreshes a cheaper variant limited to recently stored rows (an index range
scan on `feedback_stored` plus a unique-index probe per row).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import asyncpg
from asyncpg.exceptions import _base as asyncpg_base

from services.collector.errors import CollectorError, StoreUnavailableError
from services.collector.handlers import FEEDBACK_COLUMNS, INTERACTION_COLUMNS

logger = logging.getLogger(__name__)

INTERACTION_TYPES = (
    "uuid", "uuid", "text", "text", "text", "text", "text", "text", "text", "text",
    "text", "jsonb", "jsonb", "text", "text", "jsonb", "int4", "int4", "float8",
    "float8", "float8", "bool", "jsonb", "timestamptz", "timestamptz",
)  # fmt: skip
FEEDBACK_TYPES = (
    "uuid", "uuid", "text", "text", "float8", "text", "text", "timestamptz",
)  # fmt: skip

# SQLSTATE classes that blame the data, not the server: data exception, integrity
# constraint violation, program limit exceeded. Retrying such a batch cannot help.
ROW_ERROR_CLASSES = frozenset({"22", "23", "54"})


class RowRefusedError(CollectorError):
    """PostgreSQL refused the data itself; the batch must be split to find the row."""

    retriable = False


def _unnest_insert(table: str, columns: Sequence[str], types: Sequence[str]) -> str:
    # One array parameter per column; jsonb travels as text and is cast here.
    # Without a conflict target, DO NOTHING skips a row that collides on any unique
    # constraint: the event_id key, and for interactions the interaction_id too.
    arrays = ", ".join(
        f"${index}::{'text' if kind == 'jsonb' else kind}[]"
        for index, kind in enumerate(types, 1)
    )
    selected = ", ".join(
        f"{column}::jsonb" if kind == "jsonb" else column
        for column, kind in zip(columns, types, strict=True)
    )
    names = ", ".join(columns)
    # Table, column and type names are this module's constants, never input.
    return (
        f"INSERT INTO {table} ({names}) SELECT {selected} "  # noqa: S608 (constants)
        f"FROM unnest({arrays}) AS batch ({names}) ON CONFLICT DO NOTHING"
    )


INSERT_INTERACTIONS = _unnest_insert(
    "interactions", INTERACTION_COLUMNS, INTERACTION_TYPES
)
INSERT_FEEDBACK = _unnest_insert("feedback", FEEDBACK_COLUMNS, FEEDBACK_TYPES)

COUNT_ORPHANS_SINCE = """
SELECT count(*) FROM feedback AS f
WHERE f.stored_at >= now() - make_interval(secs => $1)
  AND NOT EXISTS (
      SELECT 1 FROM interactions AS i WHERE i.interaction_id = f.interaction_id)
"""
COUNT_ORPHANS_ALL = """
SELECT count(*) FROM feedback AS f
WHERE NOT EXISTS (
    SELECT 1 FROM interactions AS i WHERE i.interaction_id = f.interaction_id)
"""


class EventStore:
    """Writes batches of rows in one transaction and counts what was new."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def insert_batch(
        self,
        interaction_rows: Sequence[tuple[Any, ...]],
        feedback_rows: Sequence[tuple[Any, ...]],
    ) -> tuple[int, int]:
        """Insert both row sets atomically; return how many of each were new.

        Raises StoreUnavailableError (retry later) or RowRefusedError (split it).
        """
        try:
            async with self._pool.acquire() as connection, connection.transaction():
                stored_interactions = await _insert(
                    connection, INSERT_INTERACTIONS, interaction_rows
                )
                stored_feedback = await _insert(
                    connection, INSERT_FEEDBACK, feedback_rows
                )
        except Exception as error:
            raise _wrap(error) from error
        return stored_interactions, stored_feedback

    async def count_orphan_feedback(self, window_s: float) -> int:
        """Feedback rows without a stored interaction (stored within the window)."""
        try:
            async with self._pool.acquire() as connection:
                if window_s > 0:
                    count = await connection.fetchval(COUNT_ORPHANS_SINCE, window_s)
                else:
                    count = await connection.fetchval(COUNT_ORPHANS_ALL)
        except Exception as error:
            raise _wrap(error) from error
        return int(count)


async def _insert(
    connection: asyncpg.Connection, query: str, rows: Sequence[tuple[Any, ...]]
) -> int:
    if not rows:
        return 0
    columns = [list(column) for column in zip(*rows, strict=True)]
    status = await connection.execute(query, *columns)
    # The command tag reads "INSERT 0 <rows inserted>".
    return int(status.rsplit(" ", 1)[-1])


def _wrap(error: Exception) -> CollectorError:
    if isinstance(error, asyncpg.PostgresError) and (
        (error.sqlstate or "")[:2] in ROW_ERROR_CLASSES
    ):
        return RowRefusedError(f"PostgreSQL refused a row: {error!r}")
    if isinstance(error, asyncpg_base.DataError):
        # Raised client-side when a value cannot be encoded for its column type.
        return RowRefusedError(f"a value could not be encoded: {error!r}")
    return StoreUnavailableError(f"PostgreSQL could not take the batch: {error!r}")
