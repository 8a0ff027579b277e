"""`flywheel demo`: the whole loop turning once on the embedded default.

Phases: baseline traffic until the trainer has enough rated interactions; training
(traffic goes on, slower); canary, until the analyzer's verdict promotes or rolls back;
a short tail of traffic after the decision; then the report and the chart.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from services.common import db
from services.demo.questions import pick_questions
from services.demo.report import DemoReport, VersionStats
from services.demo.users import SimulatedUsers, UserBehaviour
from services.stack import DEV_API_KEY, Stack, StackOptions


@dataclass
class DemoOptions:
    """Every knob of the demo; `flywheel demo --help` documents each."""

    data_dir: Path = Path(".data")
    users: int = 200
    questions: int = 48
    held_out: int = 12
    concurrency: int = 2
    min_new_rated: int = 160
    epochs: int = 8
    max_steps: int | None = None
    learning_rate: float = 1e-3
    rollout_steps: list[int] = field(default_factory=lambda: [50])
    min_rated_per_arm: int = 30
    max_rated_per_arm: int = 150
    after_decision: int = 40
    max_minutes: float = 14.0
    pause_while_training: bool = True
    seed: int = 7
    report_dir: Path = Path("reports")


@dataclass
class DemoResult:
    """What the run produced, for the terminal and for the end-to-end test."""

    report: DemoReport
    chart_path: Path | None
    phase: str
    exchanges: int
    stack_ports: dict[str, int]


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


async def loop_state(pool: asyncpg.Pool, route: str) -> dict[str, Any]:
    """Where the loop stands, read from PostgreSQL (also used by `flywheel status`)."""
    versions = await pool.fetch(
        "SELECT version_id, state, scores, created_at, updated_at FROM model_versions"
        " WHERE route = $1 ORDER BY created_at",
        route,
    )
    rollout = await pool.fetchrow(
        "SELECT * FROM rollouts WHERE route = $1 ORDER BY created_at DESC LIMIT 1",
        route,
    )
    decisions = await pool.fetch(
        "SELECT d.*, r.candidate FROM rollout_decisions d"
        " JOIN rollouts r USING (rollout_id)"
        " WHERE r.route = $1 ORDER BY decision_id",
        route,
    )
    table = await pool.fetchrow(
        "SELECT version, body FROM routing_tables ORDER BY version DESC LIMIT 1"
    )
    return {
        "versions": [dict(v) for v in versions],
        "rollout": dict(rollout) if rollout else None,
        "decisions": [dict(d) for d in decisions],
        "datasets": await pool.fetchval(
            "SELECT count(*) FROM datasets WHERE route = $1", route
        ),
        "routing": dict(table) if table else None,
        "interactions": await pool.fetchval("SELECT count(*) FROM interactions"),
        "feedback": await pool.fetchval("SELECT count(*) FROM feedback"),
    }


def phase_of(state: dict[str, Any]) -> str:
    rollout = state["rollout"]
    if rollout is not None:
        return "canary" if rollout["state"] == "running" else rollout["state"]
    states = [v["state"] for v in state["versions"]]
    if "rejected" in states:
        return "rejected"
    if "training" in states or "staged" in states:
        return "training"
    return "baseline"


def routing_summary(state: dict[str, Any], route: str) -> str:
    if not state["routing"]:
        return "-"
    for item in state["routing"]["body"]["routes"]:
        if item["name"] == route:
            return " + ".join(
                f"{v['name']} {v['weight_buckets'] / 100:.0f}%"
                for v in item["variants"]
            )
    return "-"


async def scrape_sum(url: str, metric: str) -> float:
    """Sum every series of `metric` on a Prometheus text page."""
    async with httpx.AsyncClient(timeout=5) as client:
        text = (await client.get(url)).text
    pattern = re.compile(
        rf"^{re.escape(metric)}(\{{[^}}]*\}})? ([0-9.eE+-]+)$", re.MULTILINE
    )
    return sum(float(match.group(2)) for match in pattern.finditer(text))


async def drive(
    stack: Stack, options: DemoOptions, pool: asyncpg.Pool
) -> tuple[str, SimulatedUsers, list[tuple[float, str]]]:
    """Run traffic through the phases; return the final phase, the users and events."""
    route = stack.options.route
    questions = pick_questions(options.questions, options.held_out, options.seed)
    users = SimulatedUsers(
        stack.gateway_url,
        DEV_API_KEY,
        route,
        questions,
        users=options.users,
        seed=options.seed,
        behaviour=UserBehaviour(max_tokens=stack.options.max_tokens),
    )
    stop = asyncio.Event()
    traffic = asyncio.create_task(users.run(stop, concurrency=options.concurrency))
    started = time.monotonic()
    events: list[tuple[float, str]] = []
    phase, decided_at = "baseline", None
    last_line = 0.0
    try:
        while not traffic.done():
            await asyncio.sleep(1.0)
            stack.check_alive()
            state = await loop_state(pool, route)
            new_phase = phase_of(state)
            elapsed = time.monotonic() - started
            if new_phase != phase:
                events.append((elapsed, new_phase))
                _say(f"phase {phase} -> {new_phase}: {routing_summary(state, route)}")
                phase = new_phase
                if options.pause_while_training and phase == "training":
                    _say("users paused while the CPU trains and stages the candidate")
                    users.resume.clear()
                else:
                    users.resume.set()
                if phase in ("promoted", "rolled_back", "rejected"):
                    decided_at = len(users.traffic.exchanges)
            if time.monotonic() - last_line >= 10:
                last_line = time.monotonic()
                done = users.traffic.exchanges
                rate = sum(e.positive for e in done[-50:]) / max(1, len(done[-50:]))
                _say(
                    f"{phase:<9} {elapsed / 60:4.1f} min  asked {len(done):4d}  "
                    f"stored {state['interactions']:4d}  recent positive {rate:5.1%}  "
                    f"routing: {routing_summary(state, route)}"
                )
            if (
                decided_at is not None
                and len(users.traffic.exchanges) >= decided_at + options.after_decision
            ):
                break
            if elapsed > options.max_minutes * 60:
                _say(
                    f"time limit of {options.max_minutes} min reached in phase "
                    f"{phase}; "
                    "on a busy machine give it more with --max-minutes"
                )
                break
    finally:
        stop.set()
        await traffic
    return phase, users, events


async def build_report(
    stack: Stack,
    pool: asyncpg.Pool,
    users: SimulatedUsers,
    events: list[tuple[float, str]],
    elapsed_s: float,
) -> DemoReport:
    """Join the users' view with what PostgreSQL and the analyzer recorded."""
    route = stack.options.route
    exchanges = users.traffic.exchanges
    ids = [e.interaction_id for e in exchanges]
    rows = await pool.fetch(
        "SELECT interaction_id::text AS id, model_version FROM interactions"
        " WHERE interaction_id::text = ANY($1::text[])",
        ids,
    )
    version_of = {row["id"]: row["model_version"] or "?" for row in rows}
    report = DemoReport(events=events, elapsed_s=elapsed_s)
    for exchange in exchanges:
        version = version_of.get(exchange.interaction_id, "not stored")
        report.versions.setdefault(version, VersionStats()).add(exchange)
        report.timeline.append((exchange.at_s, version, exchange))
    state = await loop_state(pool, route)
    report.decisions = state["decisions"]
    report.registry = state["versions"]
    report.stored_interactions = state["interactions"]
    report.stored_feedback = state["feedback"]
    analyzer = stack.metrics_url("analyzer")
    report.analyzer_requests = await scrape_sum(
        analyzer, "flywheel_analyzer_requests_total"
    )
    report.analyzer_positive = await scrape_sum(
        analyzer, "flywheel_analyzer_positive_feedback_total"
    )
    return report


async def wait_stored(
    pool: asyncpg.Pool, interactions: int, feedback: int, timeout_s: float = 60
) -> None:
    """Wait until the collector stored what the users sent (or time runs out)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stored = await pool.fetchrow(
            "SELECT (SELECT count(*) FROM interactions) AS interactions,"
            " (SELECT count(*) FROM feedback) AS feedback"
        )
        if stored["interactions"] >= interactions and stored["feedback"] >= feedback:
            return
        await asyncio.sleep(0.5)


Inspector = Callable[[Stack, asyncpg.Pool, SimulatedUsers], Awaitable[None]]


async def run_demo(
    options: DemoOptions,
    *,
    extra_env: dict[str, str] | None = None,
    inspect: Inspector | None = None,
) -> DemoResult:
    """Start the stack, turn the loop once, report, stop everything.

    `inspect`, when given, runs after the report while the stack is still up (the
    end-to-end test reads the database and metrics there).
    """
    workdir = options.data_dir / "demo"
    if workdir.exists():
        shutil.rmtree(workdir)
    stack = Stack(
        StackOptions(
            data_dir=workdir,
            min_new_rated=options.min_new_rated,
            rollout_steps=options.rollout_steps,
            training_epochs=options.epochs,
            training_max_steps=options.max_steps,
            learning_rate=options.learning_rate,
            analyzer_min_rated=options.min_rated_per_arm,
            analyzer_max_rated=options.max_rated_per_arm,
            extra_env=extra_env or {},
        ),
        on_progress=_say,
    )
    started = time.monotonic()
    try:
        await stack.start()
        pool = await db.create_pool(stack.postgres_settings)
        try:
            phase, users, events = await drive(stack, options, pool)
            _say("traffic stopped; waiting for the collector to store the last events")
            traffic = users.traffic
            await wait_stored(
                pool, len(traffic.exchanges) + traffic.errors, traffic.feedback_sent
            )
            report = await build_report(
                stack, pool, users, events, time.monotonic() - started
            )
            if inspect is not None:
                await inspect(stack, pool, users)
            await users.close()
        finally:
            await pool.close()
    finally:
        _say("stopping every process")
        stack.stop()
    chart = report.chart(
        options.report_dir / f"demo-{time.strftime('%Y%m%d-%H%M%S')}.png"
    )
    return DemoResult(
        report=report,
        chart_path=chart,
        phase=phase,
        exchanges=len(users.traffic.exchanges),
        stack_ports=stack.ports,
    )
