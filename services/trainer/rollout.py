"""The rollout controller: canary steps for a candidate, then promote or roll back.

All state lives in PostgreSQL (registry, rollouts, routing-table versions), and every
change happens in one transaction under an advisory lock, so a controller killed
mid-step resumes exactly where the database says it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from services.common.lifecycle import sleep_or_stop
from services.common.routing import BUCKETS, Route, RoutingTable, Variant
from services.trainer import approvals
from services.trainer.approvals import Approval
from services.trainer.store import ROLLOUT_LOCK, ModelVersion, Registry, Rollout

logger = logging.getLogger(__name__)

CONTROL_ARM = "control"
MOVED_ON = "the rollout moved on meanwhile"
TREATMENT_ARM = "treatment"


@dataclass(frozen=True)
class Outcome:
    """What the controller did, and the routing-table version it left live."""

    action: str
    routing_version: int
    reason: str = ""


def variant_of(version: ModelVersion, weight_buckets: int, arm: str = "") -> Variant:
    return Variant(
        name=version.version_id,
        base_url=version.upstream_url,
        model=version.base_model,
        adapter=version.adapter or "",
        weight_buckets=weight_buckets,
        model_version=version.version_id,
        arm=arm,
    )


def production_route(route: str, production: ModelVersion) -> Route:
    return Route(name=route, variants=(variant_of(production, BUCKETS),))


def canary_route(
    route: str,
    candidate: ModelVersion,
    baseline: ModelVersion,
    percent: int,
    experiment: str,
) -> Route:
    # The canary is listed first: growing its share only adds buckets to it, so every
    # user already in the canary stays there (see services/common/routing.py).
    canary_buckets = percent * BUCKETS // 100
    return Route(
        name=route,
        experiment_id=experiment,
        variants=(
            variant_of(candidate, canary_buckets, TREATMENT_ARM),
            variant_of(baseline, BUCKETS - canary_buckets, CONTROL_ARM),
        ),
    )


class RolloutController:
    """Applies verdicts, approvals and manual actions to rollouts; owns the table.

    `policy_for(route)` is `auto` (verdicts alone move a rollout) or `approve` (a
    person's approval starts a staged candidate's rollout and promotes it to
    production once the analyzer passed its last step); `steps` are the canary
    percentages a rollout started by an approval gets.
    """

    def __init__(
        self,
        registry: Registry,
        *,
        schema: str,
        on_table: Callable[[RoutingTable], Awaitable[None]] | None = None,
        steps: list[int] | None = None,
        policy_for: Callable[[str], str] | None = None,
    ) -> None:
        self._registry = registry
        self._schema = schema
        self._on_table = on_table
        self._steps = steps or [5, 25, 50]
        self._policy_for = policy_for or (lambda route: "auto")

    def policy(self, route: str) -> str:
        """`auto` or `approve`."""
        return self._policy_for(route)

    async def _locked(self, connection: asyncpg.Connection) -> None:
        await connection.execute(
            "SELECT pg_advisory_xact_lock(hashtext($1), $2)", self._schema, ROLLOUT_LOCK
        )

    @contextlib.asynccontextmanager
    async def _step_transaction(
        self, rollout: Rollout
    ) -> AsyncIterator[asyncpg.Connection | None]:
        """A transaction under the rollout lock; None if the rollout moved on."""
        async with (
            self._registry.pool.acquire() as connection,
            connection.transaction(),
        ):
            await self._locked(connection)
            current = await self._still_current(connection, rollout)
            yield connection if current else None

    async def _still_current(
        self, connection: asyncpg.Connection, rollout: Rollout
    ) -> bool:
        """Whether `rollout` is still running at the same step (under the lock)."""
        row = await connection.fetchrow(
            "SELECT state, step_index FROM rollouts WHERE rollout_id = $1 FOR UPDATE",
            rollout.rollout_id,
        )
        return bool(
            row
            and row["state"] == "running"
            and row["step_index"] == rollout.step_index
        )

    async def _publish(self, table: RoutingTable) -> None:
        if self._on_table is not None:
            await self._on_table(table)

    async def _replace_route(
        self, connection: asyncpg.Connection, route: Route, reason: str
    ) -> RoutingTable:
        current = await self._registry.routing_table()
        routes = dict(current.routes)
        routes[route.name] = route
        return await self._registry.write_routing_table(
            connection, RoutingTable(version=current.version, routes=routes), reason
        )

    async def ensure_bootstrap(
        self, route: str, *, base_model: str, upstream_url: str
    ) -> RoutingTable:
        """Register the base model as production and route to it, once per route."""
        async with (
            self._registry.pool.acquire() as connection,
            connection.transaction(),
        ):
            await self._locked(connection)
            if await self._registry.production(route) is not None:
                return await self._registry.routing_table()
            base = ModelVersion(
                version_id=f"{route}-v1",
                route=route,
                base_model=base_model,
                adapter=None,
                upstream_url=upstream_url,
                state="production",
            )
            await self._registry.register_version(connection, base)
            table = await self._replace_route(
                connection, production_route(route, base), "bootstrap"
            )
        logger.info("route bootstrapped route=%s version=%s", route, base.version_id)
        await self._publish(table)
        return table

    async def start(
        self,
        candidate: ModelVersion,
        steps: list[int],
        *,
        source: str = "pipeline",
        reason: str = "",
    ) -> Rollout:
        """Give a staged candidate its first canary step."""
        async with (
            self._registry.pool.acquire() as connection,
            connection.transaction(),
        ):
            await self._locked(connection)
            baseline = await self._registry.production(candidate.route)
            if baseline is None:
                raise LookupError(
                    f"route {candidate.route!r} has no production version"
                )
            rollout = Rollout(
                rollout_id=f"ro-{uuid.uuid4().hex[:8]}",
                route=candidate.route,
                candidate=candidate.version_id,
                baseline=baseline.version_id,
                steps=steps,
                step_index=0,
                state="running",
            )
            await connection.execute(
                "INSERT INTO rollouts (rollout_id, route, candidate, baseline, steps,"
                " step_index, state) VALUES ($1, $2, $3, $4, $5, 0, 'running')",
                rollout.rollout_id,
                rollout.route,
                rollout.candidate,
                rollout.baseline,
                steps,
            )
            await self._registry.set_state(connection, candidate.version_id, "canary")
            route = canary_route(
                candidate.route, candidate, baseline, steps[0], rollout.experiment_id
            )
            table = await self._replace_route(connection, route, f"canary {steps[0]}%")
            await self._registry.record_decision(
                connection,
                rollout.rollout_id,
                action="started",
                source=source,
                reason=reason or f"canary at {steps[0]}%",
                verdict=None,
                routing_version=table.version,
            )
        logger.info(
            "rollout started rollout=%s candidate=%s percent=%d",
            rollout.rollout_id,
            candidate.version_id,
            steps[0],
        )
        await self._publish(table)
        return rollout

    async def on_verdict(self, route: str, verdict: dict[str, Any]) -> Outcome:
        """Act on the analyzer's verdict for the running rollout of `route`."""
        rollout = await self._registry.running_rollout(route)
        current = await self._registry.routing_table()
        if rollout is None or verdict.get("experiment_id") != rollout.experiment_id:
            return Outcome(
                "ignored", current.version, "no running step with that experiment"
            )
        decision = verdict.get("decision")
        last_step = rollout.step_index + 1 >= len(rollout.steps)
        if decision == "promote" and last_step and self.policy(route) == "approve":
            return await self._await_approval(rollout, verdict, current.version)
        if decision == "promote":
            return await self._advance(
                rollout, "analyzer", verdict.get("reason", ""), verdict
            )
        if decision == "roll_back":
            return await self._roll_back(
                rollout, "analyzer", verdict.get("reason", ""), verdict
            )
        return Outcome("held", current.version, "experiment continues")

    async def _await_approval(
        self, rollout: Rollout, verdict: dict[str, Any], routing_version: int
    ) -> Outcome:
        """Hold at the last step until a person approves the promotion."""
        reason = "the last step passed; promotion waits for an approval"
        if rollout.awaiting_approval:
            return Outcome("held", routing_version, reason)
        async with self._step_transaction(rollout) as connection:
            if connection is None:
                return Outcome("ignored", 0, MOVED_ON)
            await connection.execute(
                "UPDATE rollouts SET awaiting_approval = true, updated_at = now()"
                " WHERE rollout_id = $1",
                rollout.rollout_id,
            )
            await self._registry.record_decision(
                connection,
                rollout.rollout_id,
                action="awaiting_approval",
                source="analyzer",
                reason=verdict.get("reason", "") or reason,
                verdict=verdict,
                routing_version=routing_version,
            )
        logger.info(
            "rollout awaits approval rollout=%s candidate=%s",
            rollout.rollout_id,
            rollout.candidate,
        )
        return Outcome("held", routing_version, reason)

    async def apply_approvals(self) -> list[tuple[int, str]]:
        """Apply every unhandled approval; (approval id, outcome) for each."""
        applied = []
        for approval in await approvals.unhandled(self._registry.pool):
            try:
                outcome = await self._apply(approval)
            except (LookupError, ValueError, asyncpg.PostgresError) as error:
                # Marked handled with the reason: a broken approval is not retried
                # forever; the person approves again once the cause is fixed.
                outcome = f"failed: {error}"
            await approvals.mark_handled(
                self._registry.pool, approval.approval_id, outcome
            )
            logger.info(
                "approval handled approval=%s route=%s by=%s outcome=%s",
                approval.approval_id,
                approval.route,
                approval.approved_by,
                outcome,
            )
            applied.append((approval.approval_id, outcome))
        return applied

    async def _apply(self, approval: Approval) -> str:
        """What the approval releases: a promotion, a first step, or nothing."""
        reason = f"approved by {approval.approved_by}: {approval.reason}".rstrip(": ")
        rollout = await self._registry.running_rollout(approval.route)
        if rollout is not None:
            if not rollout.awaiting_approval or approval.version_id not in (
                None,
                rollout.candidate,
            ):
                return "nothing waiting: the running rollout is not at its promotion"
            outcome = await self._advance(rollout, "approval", reason, None)
            return outcome.action
        candidate = await self._registry.awaiting_traffic(
            approval.route, approval.version_id
        )
        if candidate is None:
            return "nothing waiting"
        await self.start(candidate, self._steps, source="approval", reason=reason)
        return "started"

    async def approvals_loop(self, stop: asyncio.Event, interval_s: float) -> None:
        """Poll for approvals until stopped."""
        while not stop.is_set():
            try:
                await self.apply_approvals()
            except (TimeoutError, OSError, asyncpg.PostgresError) as error:
                logger.warning("applying approvals failed, retrying: %r", error)
            await sleep_or_stop(stop, interval_s)

    async def promote(self, route: str, reason: str) -> Outcome:
        """Move the running rollout one step on, by hand."""
        rollout = await self._registry.running_rollout(route)
        if rollout is None:
            raise LookupError(f"route {route!r} has no running rollout")
        return await self._advance(rollout, "manual", reason, None)

    async def roll_back(self, route: str, reason: str) -> Outcome:
        """Send all traffic back to the baseline at once, by hand."""
        rollout = await self._registry.running_rollout(route)
        if rollout is None:
            raise LookupError(f"route {route!r} has no running rollout")
        return await self._roll_back(rollout, "manual", reason, None)

    async def _advance(
        self, rollout: Rollout, source: str, reason: str, verdict: dict[str, Any] | None
    ) -> Outcome:
        candidate = await self._registry.version(rollout.candidate)
        baseline = await self._registry.version(rollout.baseline)
        assert candidate is not None and baseline is not None
        next_index = rollout.step_index + 1
        async with self._step_transaction(rollout) as connection:
            if connection is None:
                return Outcome("ignored", 0, MOVED_ON)
            if next_index < len(rollout.steps):
                percent = rollout.steps[next_index]
                action = "advanced"
                experiment = f"{rollout.rollout_id}-s{next_index}"
                route = canary_route(
                    rollout.route, candidate, baseline, percent, experiment
                )
                await connection.execute(
                    "UPDATE rollouts SET step_index = $2, updated_at = now()"
                    " WHERE rollout_id = $1",
                    rollout.rollout_id,
                    next_index,
                )
                table_reason = f"canary {percent}%"
            else:
                action = "promoted"
                route = production_route(rollout.route, candidate)
                await connection.execute(
                    "UPDATE rollouts SET state = 'promoted', updated_at = now()"
                    " WHERE rollout_id = $1",
                    rollout.rollout_id,
                )
                await self._registry.set_state(
                    connection, candidate.version_id, "production"
                )
                await self._registry.set_state(
                    connection, baseline.version_id, "retired"
                )
                table_reason = f"promoted {candidate.version_id}"
            table = await self._replace_route(connection, route, table_reason)
            await self._registry.record_decision(
                connection,
                rollout.rollout_id,
                action=action,
                source=source,
                reason=reason,
                verdict=verdict,
                routing_version=table.version,
            )
        logger.info(
            "rollout %s rollout=%s source=%s reason=%s",
            action,
            rollout.rollout_id,
            source,
            reason,
        )
        await self._publish(table)
        return Outcome(action, table.version, reason)

    async def _roll_back(
        self, rollout: Rollout, source: str, reason: str, verdict: dict[str, Any] | None
    ) -> Outcome:
        baseline = await self._registry.version(rollout.baseline)
        assert baseline is not None
        async with self._step_transaction(rollout) as connection:
            if connection is None:
                return Outcome("ignored", 0, MOVED_ON)
            await connection.execute(
                "UPDATE rollouts SET state = 'rolled_back', updated_at = now()"
                " WHERE rollout_id = $1",
                rollout.rollout_id,
            )
            await self._registry.set_state(connection, rollout.candidate, "rolled_back")
            table = await self._replace_route(
                connection,
                production_route(rollout.route, baseline),
                f"rolled back {rollout.candidate}",
            )
            await self._registry.record_decision(
                connection,
                rollout.rollout_id,
                action="rolled_back",
                source=source,
                reason=reason,
                verdict=verdict,
                routing_version=table.version,
            )
        logger.warning(
            "rollout rolled back rollout=%s source=%s reason=%s",
            rollout.rollout_id,
            source,
            reason,
        )
        await self._publish(table)
        return Outcome("rolled_back", table.version, reason)
