"""Approvals for the `approve` rollout policy, stored in PostgreSQL.

`flywheel approve ROUTE` writes a row here (the command line needs only the
database, not the control plane); the rollout controller polls the unhandled rows
and applies each one (services/trainer/rollout.py, `apply_approvals`).
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg


@dataclass(frozen=True)
class Approval:
    """A person's go-ahead for whatever waits on a route (or on one version)."""

    approval_id: int
    route: str
    version_id: str | None
    approved_by: str
    reason: str


async def record_approval(
    connection: asyncpg.Connection | asyncpg.Pool,
    route: str,
    *,
    approved_by: str,
    version_id: str | None = None,
    reason: str = "",
) -> int:
    """Store an approval; the controller applies it on its next poll."""
    approval_id = await connection.fetchval(
        "INSERT INTO approvals (route, version_id, approved_by, reason)"
        " VALUES ($1, $2, $3, $4) RETURNING approval_id",
        route,
        version_id,
        approved_by,
        reason,
    )
    return int(approval_id)


async def unhandled(pool: asyncpg.Pool) -> list[Approval]:
    """Approvals not applied yet, oldest first."""
    rows = await pool.fetch(
        "SELECT approval_id, route, version_id, approved_by, reason FROM approvals"
        " WHERE handled_at IS NULL ORDER BY approval_id"
    )
    return [Approval(**dict(row)) for row in rows]


async def mark_handled(pool: asyncpg.Pool, approval_id: int, outcome: str) -> None:
    await pool.execute(
        "UPDATE approvals SET handled_at = now(), outcome = $2 WHERE approval_id = $1",
        approval_id,
        outcome,
    )


async def outcome_of(pool: asyncpg.Pool, approval_id: int) -> str | None:
    """What the controller did with an approval (None while it is unhandled)."""
    value = await pool.fetchval(
        "SELECT outcome FROM approvals WHERE approval_id = $1", approval_id
    )
    return value  # type: ignore[no-any-return]
