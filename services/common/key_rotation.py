"""`flywheel db rotate-key`: re-seal stored content to the active key.

Every row of `interactions` and `feedback` whose `content_key_id` is not the active
key (plaintext rows included) is opened with the configured keys and sealed again
under the active one. The rows go in bounded batches, each its own transaction, in
event_id order: a batch locks its rows with FOR UPDATE SKIP LOCKED, so the command
runs beside the collector (which inserts new rows and never updates old ones) and
beside another run of itself. Interrupted, it loses at most the batch in flight,
and a rerun picks up whatever is not on the active key yet. Updates go through the
partitioned parent tables, with stored_at in the key so each reaches one partition.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.sealing import (
    ACTIVE_KEY_SETTING,
    CONTENT_COLUMNS,
    KeyConfigError,
    Keyring,
    content_select,
    open_content,
)
from services.common.settings import EncryptionSettings, ServiceSettings

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 500


class RotationSettings(ServiceSettings):
    """The keys, read from the shared `FLYWHEEL_ENCRYPTION__*` variables."""

    model_config = SettingsConfigDict(
        env_prefix="FLYWHEEL_",
        env_nested_delimiter="__",
        extra="ignore",
        case_sensitive=False,
    )

    encryption: EncryptionSettings = Field(default_factory=EncryptionSettings)


@dataclass
class RotationResult:
    """Rows re-sealed per table, and rows left on another key (locked by others)."""

    resealed: dict[str, int] = field(default_factory=dict)
    remaining: dict[str, int] = field(default_factory=dict)

    @property
    def total_resealed(self) -> int:
        return sum(self.resealed.values())


def _select_batch(table: str, *, after: bool) -> str:
    # Keyset pagination over the primary key's leading column: each batch starts
    # past the last one, so rows skipped as locked are not retried in this run.
    cursor = "AND event_id > $3 " if after else ""
    return (
        f"SELECT stored_at, {content_select(table, table)} "  # noqa: S608 (constants)
        f"FROM {table} WHERE content_key_id IS DISTINCT FROM $1 {cursor}"
        "ORDER BY event_id LIMIT $2 FOR UPDATE SKIP LOCKED"
    )


def _update_batch(table: str) -> str:
    columns = CONTENT_COLUMNS[table]
    arrays = ", ".join(f"${index}::bytea[]" for index in range(4, 4 + len(columns)))
    names = ", ".join(column.sealed_name for column in columns)
    assignments = ", ".join(
        f"{column.name} = NULL, {column.sealed_name} = batch.{column.sealed_name}"
        for column in columns
    )
    return (
        f"UPDATE {table} AS t SET content_key_id = $1, {assignments} "  # noqa: S608
        f"FROM unnest($2::uuid[], $3::timestamptz[], {arrays}) "
        f"AS batch (event_id, stored_at, {names}) "
        "WHERE t.event_id = batch.event_id AND t.stored_at = batch.stored_at"
    )


def _reseal(keyring: Keyring, table: str, row: Any) -> list[bytes | None]:
    opened = open_content(keyring, table, row)
    event_id = row["event_id"]
    sealed: list[bytes | None] = []
    for column in CONTENT_COLUMNS[table]:
        value = opened[column.name]
        sealed.append(
            None
            if value is None
            else keyring.seal(column.encode(value), column.associated_data(event_id))
        )
    return sealed


async def _rotate_table(
    pool: asyncpg.Pool, keyring: Keyring, table: str, batch_size: int
) -> int:
    active = keyring.active_key_id
    first, following, update = (
        _select_batch(table, after=False),
        _select_batch(table, after=True),
        _update_batch(table),
    )
    resealed = 0
    last_event_id = None
    while True:
        async with pool.acquire() as connection, connection.transaction():
            if last_event_id is None:
                rows = await connection.fetch(first, active, batch_size)
            else:
                rows = await connection.fetch(
                    following, active, batch_size, last_event_id
                )
            if not rows:
                return resealed
            sealed = [_reseal(keyring, table, row) for row in rows]
            await connection.execute(
                update,
                active,
                [row["event_id"] for row in rows],
                [row["stored_at"] for row in rows],
                *(list(column) for column in zip(*sealed, strict=True)),
            )
        resealed += len(rows)
        last_event_id = rows[-1]["event_id"]
        logger.info("content re-sealed table=%s rows=%d", table, resealed)


async def rotate_content_key(
    pool: asyncpg.Pool, keyring: Keyring, *, batch_size: int = DEFAULT_BATCH_SIZE
) -> RotationResult:
    """Re-seal every row not on the active key to it; idempotent and resumable."""
    if keyring.active_key_id is None:
        raise KeyConfigError(
            f"nothing to rotate to: set {ACTIVE_KEY_SETTING} (and its key)"
        )
    result = RotationResult()
    for table in CONTENT_COLUMNS:
        result.resealed[table] = await _rotate_table(pool, keyring, table, batch_size)
        # A full count, once per run: rows locked by another transaction were
        # skipped, and rows a collector on an older key wrote meanwhile are counted.
        result.remaining[table] = int(
            await pool.fetchval(
                f"SELECT count(*) FROM {table}"  # noqa: S608 (constants)
                " WHERE content_key_id IS DISTINCT FROM $1",
                keyring.active_key_id,
            )
        )
    return result
