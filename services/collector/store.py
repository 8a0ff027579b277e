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
from dataclasses import dataclass
from typing import Any, NamedTuple

import asyncpg
from asyncpg.exceptions import _base as asyncpg_base

from services.collector import metrics
from services.collector.errors import CollectorError, StoreUnavailableError
from services.collector.handlers import FEEDBACK_COLUMNS, INTERACTION_COLUMNS
from services.collector.ordering import TurnState, WriteTurn

logger = logging.getLogger(__name__)

INTERACTION_TYPES = (
    "uuid", "uuid", "text", "text", "text", "text", "text", "text", "text", "text",
    "text", "jsonb", "jsonb", "text", "text", "jsonb", "int4", "int4", "float8",
    "float8", "float8", "bool", "jsonb", "timestamptz", "timestamptz", "text",
    "bytea", "bytea",
)  # fmt: skip
FEEDBACK_TYPES = (
    "uuid", "uuid", "text", "text", "float8", "text", "text", "timestamptz", "text",
    "bytea",
)  # fmt: skip

# Where a row's event came from: its record's topic, partition and offset
# ((None, None, None): not known).
Source = tuple[str | None, int | None, int | None]
NO_SOURCE: Source = (None, None, None)
EVENT_KEY_COLUMNS = ("event_id", "source_topic", "source_partition", "source_offset")
SOURCE_COLUMNS = ("source_topic", "source_partition", "source_offset")
SOURCE_TYPES = ("text", "int4", "int8")


class Repeat(NamedTuple):
    """A record repeating an event stored from another record (dead-letter it)."""

    source: Source
    detail: str


class StoredBatch(NamedTuple):
    """What a batch stored: rows new in each table, and the repeats of other records.

    Every row not stored is a duplicate; those whose event (or interaction) was
    stored from another record are in `repeats`. The rest are the same records
    read again (a replay), which is not an error.
    """

    interactions: int
    feedback: int
    repeats: tuple[Repeat, ...] = ()

    @property
    def counts(self) -> tuple[int, int]:
        return self.interactions, self.feedback


# asyncpg's words for a connection left mid-operation (by a lost server process or a
# cancellation): the connection's fault, not the store's; a new one can write.
CONNECTION_STATE_ERRORS = ("another operation is in progress", "cannot switch to state")

# SQLSTATE classes that blame the data, not the server: data exception, integrity
# constraint violation, program limit exceeded. Retrying such a batch cannot help.
ROW_ERROR_CLASSES = frozenset({"22", "23", "54"})


class StoreMisconfiguredError(CollectorError):
    """The store itself is wrong (a bug or a misconfiguration); nothing to retry."""

    retriable = False


class RowRefusedError(CollectorError):
    """PostgreSQL refused the data itself; the batch must be split to find the row."""

    retriable = False


BATCH_TABLES = {
    "interactions": "collector_batch_interactions",
    "feedback": "collector_batch_feedback",
}


def batch_table_ddl(table: str, columns: Sequence[str], types: Sequence[str]) -> str:
    """The session's staging table of `table`: a batch is COPYed in, then claimed.

    A temporary table lives as long as the connection and is emptied by every commit
    (and by a rollback, which undoes the COPY), so each transaction starts with it
    empty; `IF NOT EXISTS` makes a new pooled connection create it on first use.
    jsonb travels as the row builders' JSON text and is cast by the insert, as a
    parameter would be. `position` numbers the rows in the order COPY reads them
    (the batch's Kafka order); only its order within a batch matters.
    """
    defined = ", ".join(
        f"{column} {'text' if kind == 'jsonb' else kind}"
        for column, kind in zip(
            (*columns, *SOURCE_COLUMNS), (*types, *SOURCE_TYPES), strict=True
        )
    )
    return (
        f"CREATE TEMP TABLE IF NOT EXISTS {BATCH_TABLES[table]} "
        f"({defined}, position int8 GENERATED ALWAYS AS IDENTITY)"
        " ON COMMIT DELETE ROWS"
    )


def _staged_batch(table: str, columns: Sequence[str], types: Sequence[str]) -> str:
    # A batch may repeat an event (a producer's retry): one row per event_id, and
    # the first of the repeats (in Kafka order) wins, as it would across batches.
    selected = ", ".join(
        f"{column}::jsonb AS {column}" if kind == "jsonb" else column
        for column, kind in zip(columns, types, strict=True)
    )
    sources = ", ".join(SOURCE_COLUMNS)
    return (
        f"SELECT DISTINCT ON (event_id) {selected}, {sources}, position "  # noqa: S608
        f"FROM pg_temp.{BATCH_TABLES[table]} ORDER BY event_id, position"
    )


def keyed_insert(table: str, columns: Sequence[str], types: Sequence[str]) -> str:
    """One statement claiming the staged events' keys, inserting the rows it claimed.

    The tables are partitioned by time, so their own keys cannot be event_id alone:
    `event_keys` (and for interactions `interaction_keys`) hold the unique keys.
    A row is inserted only when its key was new; a concurrent claim of the same key
    (two collectors during a rebalance) waits for the other transaction and then
    counts as a duplicate. The command tag counts the rows inserted.
    """
    names = ", ".join(columns)
    claims = (
        f"WITH batch AS ({_staged_batch(table, columns, types)}), "  # noqa: S608
        "new_events AS (INSERT INTO event_keys (event_id, source_topic,"
        " source_partition, source_offset) SELECT event_id, source_topic,"
        " source_partition, source_offset FROM batch"
        " ON CONFLICT DO NOTHING RETURNING event_id)"
    )
    if table == "feedback":
        source = "batch JOIN new_events USING (event_id)"
    else:
        claims += (
            ", candidates AS (SELECT DISTINCT ON (interaction_id) batch.* FROM batch"
            " JOIN new_events USING (event_id) ORDER BY interaction_id, position),"
            " new_interactions AS (INSERT INTO interaction_keys (interaction_id)"
            " SELECT interaction_id FROM candidates ON CONFLICT DO NOTHING"
            " RETURNING interaction_id)"
        )
        source = "candidates JOIN new_interactions USING (interaction_id)"
    # Table and column names are this module's constants, never input.
    insert = f"INSERT INTO {table} ({names}) SELECT {names}"  # noqa: S608 (constants)
    return f"{claims} {insert} FROM {source}"


def repeats_query(table: str) -> str:
    """The staged rows of other records than the one their stored event came from.

    Run after the keyed insert, in its transaction. An event_id held by another
    record (an earlier one in the batch included); for interactions also an
    interaction_id stored under another event. A key stored without a source
    (before migration 0013) or a row staged without one is never reported.
    """
    staged = f"pg_temp.{BATCH_TABLES[table]}"
    own = (
        "(k.source_topic, k.source_partition, k.source_offset)"
        " = (s.source_topic, s.source_partition, s.source_offset)"
    )
    query = (
        "SELECT s.source_topic, s.source_partition, s.source_offset, s.event_id,"  # noqa: S608
        " k.source_topic AS held_topic, k.source_partition AS held_partition,"
        " k.source_offset AS held_offset, false AS interaction"
        f" FROM {staged} AS s JOIN event_keys AS k USING (event_id)"
        " WHERE s.source_topic IS NOT NULL AND k.source_topic IS NOT NULL"
        f" AND NOT {own}"
    )
    if table == "interactions":
        query += (
            " UNION ALL SELECT s.source_topic, s.source_partition, s.source_offset,"  # noqa: S608
            " s.event_id, NULL, NULL, NULL, true"
            f" FROM {staged} AS s JOIN event_keys AS k USING (event_id)"
            f" WHERE s.source_topic IS NOT NULL AND {own}"
            " AND NOT EXISTS (SELECT 1 FROM interactions AS i"
            " WHERE i.interaction_id = s.interaction_id AND i.event_id = s.event_id)"
        )
    return query


@dataclass(frozen=True)
class TableWriter:
    """How one table's rows are staged and claimed."""

    table: str
    columns: tuple[str, ...]
    insert: str
    repeats: str

    @property
    def staging(self) -> str:
        return BATCH_TABLES[self.table]


INTERACTIONS = TableWriter(
    "interactions",
    INTERACTION_COLUMNS,
    keyed_insert("interactions", INTERACTION_COLUMNS, INTERACTION_TYPES),
    repeats_query("interactions"),
)
FEEDBACK = TableWriter(
    "feedback",
    FEEDBACK_COLUMNS,
    keyed_insert("feedback", FEEDBACK_COLUMNS, FEEDBACK_TYPES),
    repeats_query("feedback"),
)
# Both staging tables in one round trip (no parameters: the simple protocol).
CREATE_BATCH_TABLES = "; ".join(
    (
        batch_table_ddl("interactions", INTERACTION_COLUMNS, INTERACTION_TYPES),
        batch_table_ddl("feedback", FEEDBACK_COLUMNS, FEEDBACK_TYPES),
    )
)

# What a batch's COPYs take anyway, taken at its start. A batch waits (in the intake)
# for the batch before to commit while holding these; without them first, another
# session's DDL queued between the two batches' locks (a new day partition, the
# retention dropping one) would close a cycle of waits PostgreSQL cannot see, which
# only the command timeout ends.
LOCK_EVENT_TABLES = "LOCK TABLE ONLY interactions, ONLY feedback IN ROW EXCLUSIVE MODE"

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
    """Writes batches of rows in one transaction and counts what was new.

    Rows carry jsonb as JSON text, so the pool must pass it through as text
    (`db.create_pool(settings, jsonb_as="text")`); with another jsonb codec COPY
    cannot encode it and every write raises StoreMisconfiguredError.
    """

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def insert_batch(
        self,
        interaction_rows: Sequence[tuple[Any, ...]],
        feedback_rows: Sequence[tuple[Any, ...]],
        turn: WriteTurn | None = None,
        sources: tuple[Sequence[Source], Sequence[Source]] | None = None,
    ) -> StoredBatch:
        """Insert both row sets atomically; say how many of each were new.

        The common batch repeats nothing: its keys and rows are COPYed straight into
        their tables. When a key is already taken (a replay after a crash, a
        producer's retry, two collectors during a rebalance), that transaction is
        rolled back and the batch takes the keyed path instead, which stores the
        first of each event and counts the rest as duplicates.

        `sources` (one per row of each set) is where each row's event came from; it
        is stored with the event's key, and tells a replay of the same record from a
        repeat by another record, which the result lists. With a `turn`, the batch
        claims its keys and commits in its place in the write order
        (services/collector/ordering.py), so it may overlap the batch before it.

        Raises StoreUnavailableError (retry later), RowRefusedError (split it),
        StoreMisconfiguredError (a bug: stop) or EarlierBatchAbandonedError.
        """
        turn = turn or WriteTurn()
        if sources is None:
            sources = (
                [NO_SOURCE] * len(interaction_rows),
                [NO_SOURCE] * len(feedback_rows),
            )
        try:
            await turn.may_claim()
            connection = await self._acquire()
            try:
                if await _copy_when_all_new(
                    connection, interaction_rows, feedback_rows, sources, turn
                ):
                    turn.committed()
                    return StoredBatch(len(interaction_rows), len(feedback_rows))
                metrics.REPEAT_BATCHES.inc()
                if turn.state is TurnState.CLAIMED:
                    # Rolled back after its keys were in (a row's COPY refused a
                    # repeat): the batch after it must not build on them.
                    turn.attempt_failed()
                # Keys the batches before hold must be settled first.
                await turn.may_commit()
                async with connection.transaction():
                    stored = await _insert_keyed(
                        connection, interaction_rows, feedback_rows, sources
                    )
                    turn.claimed()
                turn.committed()
                return stored
            except BaseException as error:
                if not isinstance(error, asyncpg.PostgresError | CollectorError):
                    # Cut off mid-operation (a lost connection, a cancellation): the
                    # session's state is unknown, so it is not reused. (PostgreSQL's
                    # own errors and this module's leave it rolled back and clean.)
                    connection.terminate()
                raise
            finally:
                await self._pool.release(connection)
        except BaseException as error:
            turn.attempt_failed()
            if isinstance(error, Exception):
                raise _wrap(error) from error
            raise

    async def _acquire(self) -> asyncpg.Connection:
        try:
            return await self._pool.acquire()
        except Exception as error:
            raise _wrap(error) from error

    async def ensure_partitions(self, days_ahead: int) -> int:
        """Create the day partitions from today to `days_ahead`; how many were new."""
        return await self._call("SELECT ensure_event_partitions($1)", days_ahead)

    async def drop_expired(self, keep_days: int) -> int:
        """Apply the retention; how many day partitions were dropped."""
        return await self._call("SELECT drop_expired_event_data($1)", keep_days)

    async def _call(self, query: str, argument: int) -> int:
        try:
            async with self._pool.acquire() as connection:
                return int(await connection.fetchval(query, argument))
        except Exception as error:
            raise _wrap(error) from error

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


def key_rows(
    interaction_rows: Sequence[tuple[Any, ...]],
    feedback_rows: Sequence[tuple[Any, ...]],
    sources: tuple[Sequence[Source], Sequence[Source]],
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """The key rows of a batch: `event_keys` (EVENT_KEY_COLUMNS), `interaction_keys`."""
    event_keys = [
        (row[0], *source)
        for rows, row_sources in zip(
            (interaction_rows, feedback_rows), sources, strict=True
        )
        for row, source in zip(rows, row_sources, strict=True)
    ]
    return event_keys, [(row[1],) for row in interaction_rows]


async def _copy_when_all_new(
    connection: asyncpg.Connection,
    interaction_rows: Sequence[tuple[Any, ...]],
    feedback_rows: Sequence[tuple[Any, ...]],
    sources: tuple[Sequence[Source], Sequence[Source]],
    turn: WriteTurn,
) -> bool:
    """COPY the keys, then the rows, and commit; False (rolled back) if a key was taken.

    A key another open transaction holds makes its COPY wait for that transaction,
    as an insert would: taken if it commits, free if it rolls back.
    """
    event_keys, interaction_keys = key_rows(interaction_rows, feedback_rows, sources)
    try:
        async with connection.transaction():
            # The event tables' locks first: DDL queued on them (a new partition)
            # must wait for this transaction, not between two of its statements.
            await connection.execute(LOCK_EVENT_TABLES)
            await _copy(connection, "event_keys", EVENT_KEY_COLUMNS, event_keys)
            await _copy(
                connection, "interaction_keys", ("interaction_id",), interaction_keys
            )
            turn.claimed()
            await _copy(
                connection, INTERACTIONS.table, INTERACTIONS.columns, interaction_rows
            )
            await _copy(connection, FEEDBACK.table, FEEDBACK.columns, feedback_rows)
            await turn.may_commit()
    except asyncpg.UniqueViolationError:
        return False
    return True


async def _insert_keyed(
    connection: asyncpg.Connection,
    interaction_rows: Sequence[tuple[Any, ...]],
    feedback_rows: Sequence[tuple[Any, ...]],
    sources: tuple[Sequence[Source], Sequence[Source]],
) -> StoredBatch:
    """Stage the rows, claim their keys, insert the rows that won them; find repeats."""
    await connection.execute(CREATE_BATCH_TABLES)
    stored = {INTERACTIONS.table: 0, FEEDBACK.table: 0}
    repeats: list[Repeat] = []
    for writer, rows, row_sources in (
        (INTERACTIONS, interaction_rows, sources[0]),
        (FEEDBACK, feedback_rows, sources[1]),
    ):
        if not rows:
            continue
        staged = [
            (*row, *source) for row, source in zip(rows, row_sources, strict=True)
        ]
        await _copy(
            connection,
            writer.staging,
            (*writer.columns, *SOURCE_COLUMNS),
            staged,
            schema="pg_temp",
        )
        status = await connection.execute(writer.insert)
        # The command tag reads "INSERT 0 <rows inserted>".
        stored[writer.table] = int(status.rsplit(" ", 1)[-1])
        repeats += [_repeat(found) for found in await connection.fetch(writer.repeats)]
    return StoredBatch(
        stored[INTERACTIONS.table], stored[FEEDBACK.table], tuple(repeats)
    )


def _repeat(found: asyncpg.Record) -> Repeat:
    source = (found["source_topic"], found["source_partition"], found["source_offset"])
    if found["interaction"]:
        detail = (
            f"event {found['event_id']}: its interaction_id is stored already,"
            " under another event"
        )
    else:
        detail = (
            f"event {found['event_id']} was seen already, in"
            f" {found['held_topic']} partition {found['held_partition']}"
            f" offset {found['held_offset']}"
        )
    return Repeat(source, detail)


async def _copy(
    connection: asyncpg.Connection,
    table: str,
    columns: Sequence[str],
    rows: Sequence[tuple[Any, ...]],
    *,
    schema: str | None = None,
) -> None:
    """COPY the rows into the table (binary format); nothing when there are none."""
    if not rows:
        return
    try:
        await connection.copy_records_to_table(
            table, schema_name=schema, columns=list(columns), records=rows
        )
    except (TypeError, ValueError, OverflowError) as error:
        # Raised client-side while encoding a value for its column type (a
        # parameter's encoder raises asyncpg's DataError for the same).
        raise RowRefusedError(f"a value could not be encoded: {error!r}") from error


def _wrap(error: Exception) -> CollectorError:
    if isinstance(error, CollectorError):
        return error
    if isinstance(error, asyncpg.PostgresError) and (
        (error.sqlstate or "")[:2] in ROW_ERROR_CLASSES
    ):
        return RowRefusedError(f"PostgreSQL refused a row: {error!r}")
    if isinstance(error, asyncpg_base.InternalClientError) and not any(
        state in str(error) for state in CONNECTION_STATE_ERRORS
    ):
        # A bug (a pool whose jsonb codec cannot COPY, say): retrying cannot help.
        return StoreMisconfiguredError(f"the store cannot write: {error!r}")
    if isinstance(error, asyncpg_base.DataError):
        # Raised client-side when a value cannot be encoded for its column type.
        return RowRefusedError(f"a value could not be encoded: {error!r}")
    return StoreUnavailableError(f"PostgreSQL could not take the batch: {error!r}")
