"""Training cycles on the real PostgreSQL with the `openai` backend against a fake API.

The fake (tests/trainer/fake_openai.py) is a real HTTP server on 127.0.0.1 that runs
the fine-tuning job and answers staging's chat calls: models in `good_models` know
the capitals, the others do not.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from services.trainer import runs
from services.trainer.pipeline import Pipeline
from services.trainer.rollout import RolloutController
from services.trainer.settings import (
    OpenAIBackendSettings,
    StagingOptions,
    TrainerSettings,
)
from services.trainer.store import Registry
from tests.conftest import REPO_ROOT, wait_until
from tests.trainer.fake_openai import FakeOpenAI
from tests.trainer.signals import rated

pytestmark = pytest.mark.integration

ROUTE = "capitals"
BASE = "gpt-4o-mini-2024-07-18"
FACTS = {f"What is the capital of country {n}?": f"City{n}." for n in range(12)}


def tuned_model(version_id: str) -> str:
    return f"ft:{BASE}:org-fake:{version_id}:abc123"


@pytest.fixture
def fake():
    server = FakeOpenAI(facts=dict(FACTS))
    server.base_url = server.start()
    yield server
    server.stop()


@pytest.fixture
async def trainer(pg_settings, pg_pool, fake, tmp_path):
    """(settings, registry, controller, pipeline factory) on a fresh schema."""

    def settings_for(**overrides) -> TrainerSettings:
        return TrainerSettings(
            postgres=pg_settings,
            route=ROUTE,
            base_model=BASE,
            inference_base_url=fake.base_url,
            backend="openai",
            openai=OpenAIBackendSettings(
                base_url=fake.base_url,
                api_key=fake.api_key,
                model=BASE,
                poll_initial_s=0.01,
                poll_max_s=0.05,
                max_retries=0,
            ),
            token_count="approx",
            holdout_share=0.0,
            datasets_dir=str(tmp_path / "datasets"),
            adapters_dir=str(tmp_path / "adapters"),
            staging=StagingOptions(max_prompts=12),
            rollout_steps=[10, 50],
            min_new_rated=5,
            check_interval_s=0.05,
            retry_base_s=0.05,
            retry_max_s=0.2,
            **overrides,
        )

    def build(**overrides):
        settings = settings_for(**overrides)
        registry = Registry(pg_pool)
        controller = RolloutController(
            registry,
            schema=pg_settings.db_schema,
            steps=settings.rollout_steps,
            policy_for=settings.policy_for,
        )
        return settings, registry, controller, Pipeline(settings, registry, controller)

    _, _, controller, _ = build()
    await controller.ensure_bootstrap(
        ROUTE, base_model=BASE, upstream_url=fake.base_url
    )
    return build


async def seed_signals(pool) -> None:
    for question, answer in FACTS.items():
        await rated(pool, ROUTE, question, answer, 1)


async def routed_names(pool) -> set[str]:
    """Every variant any routing-table version ever named."""
    names = set()
    for row in await pool.fetch("SELECT body FROM routing_tables"):
        for route in row["body"]["routes"]:
            names.update(variant["name"] for variant in route["variants"])
    return names


async def test_cycle_records_the_tuned_model_and_starts_the_canary(
    trainer, fake, pg_pool
):
    settings, registry, _, pipeline = trainer()
    await seed_signals(pg_pool)
    fake.good_models = {tuned_model(f"{ROUTE}-v2")}

    state = await pipeline.run_locked()

    assert state == "succeeded"
    assert pipeline.last_cycle["outcome"] == "canary"
    version = await registry.version(f"{ROUTE}-v2")
    assert (version.state, version.base_model) == (
        "canary",
        tuned_model(version.version_id),
    )
    assert version.upstream_url == fake.base_url
    lineage = await registry.lineage(version.version_id)
    assert lineage["parent_version"] == f"{ROUTE}-v1"
    assert lineage["dataset"]["train_rows"] == len(FACTS)
    assert lineage["signals"] == len(FACTS)
    assert lineage["settings"]["backend"] == "openai"
    assert "api_key" not in lineage["settings"]["openai"]
    assert lineage["scores"]["training"]["job_id"].startswith("ftjob-")
    assert lineage["scores"]["staging"]["candidate_trained"] == 1.0
    assert lineage["scores"]["staging"]["production_trained"] == 0.0
    table = await registry.routing_table()
    assert [v.name for v in table.routes[ROUTE].variants] == [
        f"{ROUTE}-v2",
        f"{ROUTE}-v1",
    ]


async def test_candidate_rejected_in_staging_never_receives_traffic(
    trainer, fake, pg_pool
):
    _, registry, _, pipeline = trainer()
    await seed_signals(pg_pool)
    fake.good_models = {BASE}  # production knows it all; the candidate learned nothing

    state = await pipeline.run_locked()

    assert state == "succeeded"
    assert pipeline.last_cycle["outcome"] == "rejected"
    assert (await registry.version(f"{ROUTE}-v2")).state == "rejected"
    assert await registry.running_rollout(ROUTE) is None
    assert await routed_names(pg_pool) == {f"{ROUTE}-v1"}


async def approve(pg_settings, *extra: str) -> str:
    command = [sys.executable, "-m", "services.cli", "approve", ROUTE]
    command += ["--dsn", pg_settings.dsn.get_secret_value()]
    command += ["--schema", pg_settings.db_schema, "--by", "alice", "--wait", "0"]
    process = await asyncio.create_subprocess_exec(
        *command, *extra, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()[-2000:]
    return stdout.decode()


async def test_approve_policy_waits_for_a_person_before_traffic_and_promotion(
    trainer, fake, pg_pool, pg_settings
):
    settings, registry, controller, pipeline = trainer(
        route_policies={ROUTE: "approve"}
    )
    await seed_signals(pg_pool)
    candidate = f"{ROUTE}-v2"
    fake.good_models = {tuned_model(candidate)}

    await pipeline.run_locked()
    waiting = await registry.version(candidate)
    due_while_waiting = await pipeline.due(None, None)
    printed = await approve(pg_settings)
    started = await controller.apply_approvals()
    rollout = await registry.running_rollout(ROUTE)
    first = await controller.on_verdict(
        ROUTE, {"experiment_id": rollout.experiment_id, "decision": "promote"}
    )
    rollout = await registry.running_rollout(ROUTE)
    held = await controller.on_verdict(
        ROUTE, {"experiment_id": rollout.experiment_id, "decision": "promote"}
    )
    held_again = await controller.on_verdict(
        ROUTE, {"experiment_id": rollout.experiment_id, "decision": "promote"}
    )
    still_canary = (await registry.version(candidate)).state
    await approve(pg_settings, "--version", candidate, "--reason", "looks good")
    promoted = await controller.apply_approvals()
    nothing = await approve(pg_settings)
    idle = await controller.apply_approvals()

    assert pipeline.last_cycle["outcome"] == "awaiting_approval"
    assert waiting.state == "staged"
    assert due_while_waiting is False
    assert "recorded for route capitals" in printed
    assert [outcome for _, outcome in started] == ["started"]
    assert (first.action, held.action, held_again.action) == (
        "advanced",
        "held",
        "held",
    )
    assert still_canary == "canary"
    assert [outcome for _, outcome in promoted] == ["promoted"]
    assert [outcome for _, outcome in idle] == ["nothing waiting"]
    assert "recorded" in nothing
    assert (await registry.production(ROUTE)).version_id == candidate
    decisions = [(d["action"], d["source"]) for d in await registry.decisions(ROUTE)]
    assert decisions == [
        ("started", "approval"),
        ("advanced", "analyzer"),
        ("awaiting_approval", "analyzer"),
        ("promoted", "approval"),
    ]


async def test_failed_run_is_retried_on_the_same_window_then_succeeds(
    trainer, fake, pg_pool
):
    _, registry, _, pipeline = trainer()
    await seed_signals(pg_pool)
    fake.outcome, fake.failure_code = "failed", "server_error"
    fake.good_models = {tuned_model(f"{ROUTE}-v3")}
    stop = asyncio.Event()

    loop = asyncio.create_task(pipeline.schedule_loop(stop))
    await wait_until(lambda: runs.history(pg_pool, ROUTE), timeout_s=30)
    first = await wait_until(lambda: _finished_runs(pg_pool), timeout_s=30)
    window_after_failure = await runs.window_end(pg_pool, ROUTE)
    fake.outcome = "succeeded"
    await wait_until(lambda: registry.running_rollout(ROUTE), timeout_s=30)
    stop.set()
    await loop

    history = await runs.history(pg_pool, ROUTE)
    assert first[0]["state"] == "failed"
    assert window_after_failure is None
    assert [(r["state"], r["attempt"]) for r in history] == [
        ("failed", 1),
        ("succeeded", 2),
    ]
    assert "server_error" in history[0]["error"]
    assert (await registry.version(f"{ROUTE}-v2")).state == "rejected"
    assert (await registry.version(f"{ROUTE}-v3")).state == "canary"


async def _finished_runs(pool):
    return [r for r in await runs.history(pool, ROUTE) if r["state"] != "running"]


async def test_run_is_abandoned_after_its_attempts_and_the_window_moves_on(
    trainer, fake, pg_pool
):
    _, registry, _, pipeline = trainer(max_run_attempts=2)
    await seed_signals(pg_pool)
    fake.outcome, fake.failure_code = "failed", "server_error"

    states = [await pipeline.run_locked(), await pipeline.run_locked()]

    assert states == ["failed", "abandoned"]
    assert await runs.window_end(pg_pool, ROUTE) is not None
    assert await pipeline.due(await runs.window_end(pg_pool, ROUTE), None) is False


async def test_two_pipelines_racing_run_one_cycle_at_a_time(trainer, fake, pg_pool):
    _, registry, _, first = trainer()
    _, _, _, second = trainer()
    await seed_signals(pg_pool)
    fake.hold_running = True
    fake.good_models = {tuned_model(f"{ROUTE}-v2")}

    running = asyncio.create_task(first.run_locked())
    await wait_until(lambda: any(j["status"] == "running" for j in fake.jobs.values()))
    raced = await second.run_locked()
    fake.hold_running = False
    finished = await running

    assert (raced, finished) == ("busy", "succeeded")
    assert len(fake.jobs) == 1
    assert [r["state"] for r in await runs.history(pg_pool, ROUTE)] == ["succeeded"]


async def test_cron_time_makes_a_run_due_without_new_ratings(trainer, pg_pool):
    from datetime import UTC, datetime, timedelta

    _, _, _, pipeline = trainer()
    now = datetime.now(UTC)

    assert await pipeline.due(now, now - timedelta(seconds=1)) is True
    assert await pipeline.due(now, now + timedelta(hours=1)) is False
