"""What the report reads from PostgreSQL: KPIs per model version, decisions."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

# A rating and a positive rating, as Feedback.is_positive() decides them.
RATED = "f.value IS NOT NULL AND f.kind IN ('thumbs', 'score', 'copy', 'regenerate')"
POSITIVE = (
    "f.value IS NOT NULL AND ((f.kind = 'score' AND f.value >= 0.5) "
    "OR (f.kind IN ('thumbs', 'copy') AND f.value > 0))"
)
VERSION = "coalesce(i.model_version, i.variant)"

KPI_SQL = f"""
WITH rated AS (
    SELECT f.interaction_id, f.project_id,
           count(*) AS feedback,
           count(*) FILTER (WHERE {RATED}) AS rated,
           count(*) FILTER (WHERE {POSITIVE}) AS positive,
           count(*) FILTER (WHERE f.kind = 'correction') AS corrections
    FROM feedback f
    GROUP BY f.interaction_id, f.project_id
)
SELECT i.route, {VERSION} AS version,
       count(*) AS requests,
       count(*) FILTER (WHERE i.error IS NOT NULL) AS errors,
       avg(i.latency_s) AS mean_latency_s,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY i.latency_s) AS p95_latency_s,
       sum(i.cost_usd) AS cost_usd,
       sum(i.prompt_tokens + i.completion_tokens) AS tokens,
       coalesce(sum(r.feedback), 0) AS feedback,
       coalesce(sum(r.rated), 0) AS rated,
       coalesce(sum(r.positive), 0) AS positive,
       coalesce(sum(r.corrections), 0) AS corrections
FROM interactions i
LEFT JOIN rated r USING (interaction_id, project_id)
WHERE i.finished_at >= $1 AND i.finished_at < $2
GROUP BY i.route, version
ORDER BY i.route, min(i.finished_at)
"""  # noqa: S608 - built from constants only

# Ratings per version in time bins, for the chart.
SERIES_SQL = f"""
SELECT {VERSION} AS version,
       to_timestamp(floor(extract(epoch FROM i.finished_at) / $3) * $3) AS bin,
       count(DISTINCT i.interaction_id) AS requests,
       count(*) FILTER (WHERE {RATED}) AS rated,
       count(*) FILTER (WHERE {POSITIVE}) AS positive
FROM interactions i
LEFT JOIN feedback f USING (interaction_id, project_id)
WHERE i.finished_at >= $1 AND i.finished_at < $2
GROUP BY version, bin
ORDER BY bin
"""  # noqa: S608 - built from constants only

DECISIONS_SQL = """
SELECT d.created_at, r.rollout_id, r.route, r.candidate, r.baseline, r.state,
       d.action, d.source, d.reason, d.verdict
FROM rollout_decisions d
JOIN rollouts r USING (rollout_id)
WHERE d.created_at >= $1 AND d.created_at < $2
ORDER BY d.created_at, d.decision_id
"""


@dataclass(frozen=True)
class VersionKpis:
    """One model version's numbers over the report's period."""

    route: str
    version: str
    requests: int
    errors: int
    mean_latency_s: float
    p95_latency_s: float
    cost_usd: float
    tokens: int
    feedback: int
    rated: int
    positive: int
    corrections: int

    @property
    def positive_rate(self) -> float | None:
        return self.positive / self.rated if self.rated else None

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


@dataclass(frozen=True)
class SeriesPoint:
    version: str
    bin_start: datetime
    requests: int
    rated: int
    positive: int


@dataclass(frozen=True)
class Decision:
    """One decision taken on a rollout (an experiment step) in the period."""

    created_at: datetime
    rollout_id: str
    route: str
    candidate: str
    baseline: str
    rollout_state: str
    action: str
    source: str
    reason: str
    verdict: dict[str, Any] | None


async def fetch_kpis(
    connection: asyncpg.Connection, start: datetime, end: datetime
) -> list[VersionKpis]:
    rows = await connection.fetch(KPI_SQL, start, end)
    return [
        VersionKpis(
            route=row["route"],
            version=row["version"],
            requests=row["requests"],
            errors=row["errors"],
            mean_latency_s=float(row["mean_latency_s"] or 0),
            p95_latency_s=float(row["p95_latency_s"] or 0),
            cost_usd=float(row["cost_usd"] or 0),
            tokens=int(row["tokens"] or 0),
            feedback=int(row["feedback"]),
            rated=int(row["rated"]),
            positive=int(row["positive"]),
            corrections=int(row["corrections"]),
        )
        for row in rows
    ]


async def fetch_series(
    connection: asyncpg.Connection, start: datetime, end: datetime, bin_s: int
) -> list[SeriesPoint]:
    rows = await connection.fetch(SERIES_SQL, start, end, bin_s)
    return [
        SeriesPoint(
            row["version"], row["bin"], row["requests"], row["rated"], row["positive"]
        )
        for row in rows
    ]


async def fetch_decisions(
    connection: asyncpg.Connection, start: datetime, end: datetime
) -> list[Decision]:
    rows = await connection.fetch(DECISIONS_SQL, start, end)
    return [
        Decision(
            created_at=row["created_at"],
            rollout_id=row["rollout_id"],
            route=row["route"],
            candidate=row["candidate"],
            baseline=row["baseline"],
            rollout_state=row["state"],
            action=row["action"],
            source=row["source"],
            reason=row["reason"],
            verdict=_as_dict(row["verdict"]),
        )
        for row in rows
    ]


def _as_dict(value: Any) -> dict[str, Any] | None:
    """A jsonb verdict (the pool decodes jsonb to Python objects)."""
    return dict(value) if isinstance(value, dict) else None
