"""The trainer's SQL: model registry, routing-table versions, rollouts and decisions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg

from services.common.routing import RoutingTable

# Advisory-lock keys (with the schema hashed in) so replicas serialize their work.
TRAINING_LOCK = 1
ROLLOUT_LOCK = 2

# A version's life: training -> staged -> canary -> production -> retired, or off
# the path to rejected (failed training or staging) or rolled_back (by a verdict or
# by hand). A staged candidate no one approved may be retired by a newer one.
TRANSITIONS: dict[str, frozenset[str]] = {
    "staged": frozenset({"training"}),
    "rejected": frozenset({"training", "staged"}),
    "canary": frozenset({"staged"}),
    "production": frozenset({"canary"}),
    "rolled_back": frozenset({"canary"}),
    "retired": frozenset({"production", "staged"}),
}

# The newest staged candidate that passed staging and has not had traffic yet.
AWAITING_TRAFFIC_SQL = """
SELECT * FROM model_versions
WHERE route = $1 AND state = 'staged'
  AND (scores -> 'staging' ->> 'passed')::boolean
  AND ($2::text IS NULL OR version_id = $2)
ORDER BY created_at DESC LIMIT 1
"""


class InvalidTransitionError(ValueError):
    """A version was asked to move to a state its current state cannot reach."""


@dataclass(frozen=True)
class ModelVersion:
    """One registered model version."""

    version_id: str
    route: str
    base_model: str
    adapter: str | None
    upstream_url: str
    state: str
    parent_version: str | None = None
    dataset_id: str | None = None


@dataclass(frozen=True)
class Rollout:
    """A candidate being rolled out on a route, step by step."""

    rollout_id: str
    route: str
    candidate: str
    baseline: str
    steps: list[int]
    step_index: int
    state: str
    awaiting_approval: bool = False

    @property
    def experiment_id(self) -> str:
        """Each step is its own experiment, with its own planned split."""
        return f"{self.rollout_id}-s{self.step_index}"


def _version(row: asyncpg.Record) -> ModelVersion:
    return ModelVersion(
        version_id=row["version_id"],
        route=row["route"],
        base_model=row["base_model"],
        adapter=row["adapter"],
        upstream_url=row["upstream_url"],
        state=row["state"],
        parent_version=row["parent_version"],
        dataset_id=row["dataset_id"],
    )


def _rollout(row: asyncpg.Record) -> Rollout:
    return Rollout(
        rollout_id=row["rollout_id"],
        route=row["route"],
        candidate=row["candidate"],
        baseline=row["baseline"],
        steps=list(row["steps"]),
        step_index=row["step_index"],
        state=row["state"],
        awaiting_approval=row["awaiting_approval"],
    )


class Registry:
    """Reads and writes the trainer's tables through one pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def register_version(
        self,
        connection: asyncpg.Connection | asyncpg.Pool,
        version: ModelVersion,
        *,
        settings: dict[str, Any] | None = None,
    ) -> None:
        await connection.execute(
            "INSERT INTO model_versions (version_id, route, base_model, adapter,"
            " upstream_url, parent_version, dataset_id, state, settings)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            version.version_id,
            version.route,
            version.base_model,
            version.adapter,
            version.upstream_url,
            version.parent_version,
            version.dataset_id,
            version.state,
            settings or {},
        )

    async def set_state(
        self, connection: asyncpg.Connection | asyncpg.Pool, version_id: str, state: str
    ) -> None:
        """Move a version to `state`; refuses a move the life cycle does not allow."""
        moved = await connection.fetchval(
            "UPDATE model_versions SET state = $2, updated_at = now()"
            " WHERE version_id = $1 AND state = ANY($3::text[]) RETURNING version_id",
            version_id,
            state,
            sorted(TRANSITIONS.get(state, ())),
        )
        if moved is None:
            current = await connection.fetchval(
                "SELECT state FROM model_versions WHERE version_id = $1", version_id
            )
            raise InvalidTransitionError(
                f"version {version_id!r} cannot move from {current!r} to {state!r}"
            )

    async def set_target(
        self, version_id: str, *, base_model: str, adapter: str | None, upstream: str
    ) -> None:
        """Where a trained version is served (the `openai` backend learns it late)."""
        await self.pool.execute(
            "UPDATE model_versions SET base_model = $2, adapter = $3,"
            " upstream_url = $4, updated_at = now() WHERE version_id = $1",
            version_id,
            base_model,
            adapter,
            upstream,
        )

    async def set_scores(self, version_id: str, scores: dict[str, Any]) -> None:
        await self.pool.execute(
            "UPDATE model_versions SET scores = scores || $2, updated_at = now()"
            " WHERE version_id = $1",
            version_id,
            scores,
        )

    async def version(self, version_id: str) -> ModelVersion | None:
        row = await self.pool.fetchrow(
            "SELECT * FROM model_versions WHERE version_id = $1", version_id
        )
        return _version(row) if row else None

    async def production(self, route: str) -> ModelVersion | None:
        row = await self.pool.fetchrow(
            "SELECT * FROM model_versions WHERE route = $1 AND state = 'production'"
            " ORDER BY updated_at DESC LIMIT 1",
            route,
        )
        return _version(row) if row else None

    async def awaiting_traffic(
        self, route: str, version_id: str | None = None
    ) -> ModelVersion | None:
        """A staged candidate that passed staging and waits for an approval."""
        row = await self.pool.fetchrow(AWAITING_TRAFFIC_SQL, route, version_id)
        return _version(row) if row else None

    async def lineage(self, version_id: str) -> dict[str, Any] | None:
        """A version with its base, parent, dataset snapshot, settings and scores."""
        row = await self.pool.fetchrow(
            "SELECT v.*, to_jsonb(d) - 'route' AS dataset FROM model_versions v"
            " LEFT JOIN datasets d USING (dataset_id) WHERE v.version_id = $1",
            version_id,
        )
        if row is None:
            return None
        lineage = dict(row)
        lineage["signals"] = await self.pool.fetchval(
            "SELECT count(*) FROM dataset_rows WHERE dataset_id = $1",
            row["dataset_id"],
        )
        return lineage

    async def next_version_number(self, route: str) -> int:
        count = await self.pool.fetchval(
            "SELECT count(*) FROM model_versions WHERE route = $1", route
        )
        return int(count) + 1

    async def list_versions(self, route: str | None = None) -> list[dict[str, Any]]:
        rows = await self.pool.fetch(
            "SELECT version_id, route, state, adapter, dataset_id, scores, created_at"
            " FROM model_versions WHERE $1::text IS NULL OR route = $1"
            " ORDER BY created_at",
            route,
        )
        return [dict(row) for row in rows]

    # -- routing table ---------------------------------------------------------

    async def routing_table(self) -> RoutingTable:
        row = await self.pool.fetchrow(
            "SELECT body FROM routing_tables ORDER BY version DESC LIMIT 1"
        )
        return RoutingTable.from_json(row["body"]) if row else RoutingTable(version=0)

    async def write_routing_table(
        self, connection: asyncpg.Connection, table: RoutingTable, reason: str
    ) -> RoutingTable:
        """Store `table` as the next version (inside the caller's transaction)."""
        current = await connection.fetchval(
            "SELECT coalesce(max(version), 0) FROM routing_tables"
        )
        versioned = RoutingTable(version=int(current) + 1, routes=table.routes)
        await connection.execute(
            "INSERT INTO routing_tables (version, body, reason) VALUES ($1, $2, $3)",
            versioned.version,
            versioned.to_json(),
            reason,
        )
        return versioned

    # -- rollouts --------------------------------------------------------------

    async def running_rollout(self, route: str) -> Rollout | None:
        row = await self.pool.fetchrow(
            "SELECT * FROM rollouts WHERE route = $1 AND state = 'running'", route
        )
        return _rollout(row) if row else None

    async def rollout(self, rollout_id: str) -> Rollout | None:
        row = await self.pool.fetchrow(
            "SELECT * FROM rollouts WHERE rollout_id = $1", rollout_id
        )
        return _rollout(row) if row else None

    async def record_decision(
        self,
        connection: asyncpg.Connection,
        rollout_id: str,
        *,
        action: str,
        source: str,
        reason: str,
        verdict: dict[str, Any] | None,
        routing_version: int | None,
    ) -> None:
        await connection.execute(
            "INSERT INTO rollout_decisions"
            " (rollout_id, action, source, reason, verdict,"
            " routing_version) VALUES ($1, $2, $3, $4, $5, $6)",
            rollout_id,
            action,
            source,
            reason,
            verdict,
            routing_version,
        )

    async def decisions(self, route: str | None = None) -> list[dict[str, Any]]:
        rows = await self.pool.fetch(
            "SELECT d.*, r.route, r.candidate, r.baseline FROM rollout_decisions d"
            " JOIN rollouts r USING (rollout_id)"
            " WHERE $1::text IS NULL OR r.route = $1 ORDER BY d.decision_id",
            route,
        )
        return [dict(row) for row in rows]
