"""The whole loop at small scale: every service as its own process, real parts only."""

from __future__ import annotations

from typing import Any

import pytest

from services.demo.runner import DemoOptions, run_demo, scrape_sum
from tests.conftest import server_data_dir, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.model]


async def test_the_loop_turns_once(tmp_path):
    seen: dict[str, Any] = {}

    async def inspect(stack, pool, users):
        traffic = users.traffic
        seen["asked"] = len(traffic.exchanges)
        seen["errors"] = traffic.errors
        seen["feedback_errors"] = traffic.feedback_errors
        seen["feedback_sent"] = traffic.feedback_sent
        seen["positive"] = sum(e.positive for e in traffic.exchanges)
        seen["interactions"] = await pool.fetchval("SELECT count(*) FROM interactions")
        seen["distinct_interactions"] = await pool.fetchval(
            "SELECT count(DISTINCT interaction_id) FROM interactions"
        )
        seen["feedback"] = await pool.fetchval("SELECT count(*) FROM feedback")
        seen["versions"] = {
            r["version_id"]: r["state"]
            for r in await pool.fetch("SELECT version_id, state FROM model_versions")
        }
        seen["tables"] = [
            r["body"]
            for r in await pool.fetch(
                "SELECT body FROM routing_tables ORDER BY version"
            )
        ]
        seen["decisions"] = [
            r["action"]
            for r in await pool.fetch(
                "SELECT action FROM rollout_decisions ORDER BY decision_id"
            )
        ]
        analyzer = stack.metrics_url("analyzer")
        seen["metric_requests"] = await wait_until(
            lambda: _when_equal(
                scrape_sum(analyzer, "flywheel_analyzer_requests_total"),
                seen["interactions"],
            ),
            timeout_s=30,
        )
        seen["metric_positive"] = await scrape_sum(
            analyzer, "flywheel_analyzer_positive_feedback_total"
        )

    options = DemoOptions(
        users=100,
        questions=12,
        held_out=3,
        concurrency=2,
        min_new_rated=24,
        epochs=4,
        max_steps=8,
        learning_rate=2e-3,
        rollout_steps=[50],
        min_rated_per_arm=6,
        max_rated_per_arm=20,
        after_decision=6,
        max_minutes=10,
        report_dir=tmp_path / "reports",
    )
    extra = {
        "FLYWHEEL_TRAINER_STAGING__MAX_PROMPTS": "5",
        "FLYWHEEL_TRAINER_STAGING__MAX_HOLDOUT_REGRESSION": "1.0",
    }

    with server_data_dir("e2e") as data_dir:
        options.data_dir = data_dir
        result = await run_demo(options, extra_env=extra, inspect=inspect)

    # Every event arrived exactly once.
    assert seen["errors"] == seen["feedback_errors"] == 0
    assert seen["interactions"] == seen["distinct_interactions"] == seen["asked"]
    assert seen["feedback"] == seen["feedback_sent"]
    # The analyzer's metrics moved with the traffic.
    assert seen["metric_requests"] == seen["interactions"]
    assert seen["metric_positive"] == seen["positive"]
    # A model version was trained and registered.
    candidates = {v: s for v, s in seen["versions"].items() if not v.endswith("-v1")}
    assert candidates, "no candidate version was registered"
    candidate = next(iter(candidates))
    # The routing table changed exactly as decided.
    final = {r["name"]: r for r in seen["tables"][-1]["routes"]}["capitals-bot"]
    served = [v["name"] for v in final["variants"]]
    ever_served = {
        v["name"] for t in seen["tables"] for r in t["routes"] for v in r["variants"]
    }
    assert result.phase in ("promoted", "rolled_back", "rejected")
    if result.phase == "promoted":
        assert served == [candidate] and candidates[candidate] == "production"
        assert seen["decisions"][-1] == "promoted"
    elif result.phase == "rolled_back":
        assert served == ["capitals-bot-v1"] and candidate in ever_served
        assert seen["decisions"][-1] == "rolled_back"
    else:
        assert candidate not in ever_served and candidates[candidate] == "rejected"
    assert result.chart_path is not None and result.chart_path.stat().st_size > 10_000


async def _when_equal(value_coro, expected):
    value = await value_coro
    return value if value == expected else None
