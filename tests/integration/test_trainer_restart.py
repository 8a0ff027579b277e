"""A rollout survives the controller process being killed with SIGKILL mid-step."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from grpc import aio

from services.common.control import auth_metadata, open_channel
from services.common.embedded import free_port
from services.common.pb.flywheel.v1 import control_pb2 as pb
from services.common.pb.flywheel.v1 import control_pb2_grpc as pb_grpc
from services.common.settings import ControlPlaneSettings
from services.trainer.rollout import RolloutController
from services.trainer.store import ModelVersion, Registry
from tests.conftest import REPO_ROOT, wait_until

pytestmark = pytest.mark.integration

ROUTE = "bot"


def start_trainer(pg_settings, port: int, token: str, log_path) -> subprocess.Popen:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("FLYWHEEL")
    }
    env |= {
        "FLYWHEEL_TRAINER_POSTGRES__DSN": pg_settings.dsn.get_secret_value(),
        "FLYWHEEL_TRAINER_POSTGRES__DB_SCHEMA": pg_settings.db_schema,
        "FLYWHEEL_TRAINER_GRPC_PORT": str(port),
        "FLYWHEEL_TRAINER_METRICS_PORT": "0",
        "FLYWHEEL_TRAINER_CONTROL__TOKEN": token,
        "FLYWHEEL_TRAINER_ROUTE": ROUTE,
        "FLYWHEEL_TRAINER_ROLLOUT_STEPS": "[5, 25, 50]",
        "FLYWHEEL_TRAINER_MIN_NEW_RATED": "1000000",
        "FLYWHEEL_TRAINER_TOKEN_COUNT": "approx",
        "FLYWHEEL_TRAINER_INFERENCE_BASE_URL": "http://127.0.0.1:9/v1",
    }
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "services.trainer"],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


async def answers(settings: ControlPlaneSettings) -> bool:
    try:
        async with open_channel(settings) as channel:
            await pb_grpc.RoutingServiceStub(channel).GetRoutingTable(
                pb.GetRoutingTableRequest(), metadata=auth_metadata(settings), timeout=2
            )
    except aio.AioRpcError:
        return False
    return True


async def report(settings: ControlPlaneSettings, experiment_id: str) -> pb.VerdictAck:
    async with open_channel(settings) as channel:
        return await pb_grpc.RolloutServiceStub(channel).ReportVerdict(
            pb.ExperimentVerdict(
                experiment_id=experiment_id,
                route=ROUTE,
                decision=pb.DECISION_PROMOTE,
                reason="test",
            ),
            metadata=auth_metadata(settings),
            timeout=10,
        )


async def test_rollout_resumes_from_the_stored_step_after_sigkill(
    pg_settings, pg_pool, tmp_path
):
    port = free_port()
    settings = ControlPlaneSettings(address=f"127.0.0.1:{port}", token="s3cret")
    log_path = tmp_path / "trainer.log"
    process = start_trainer(pg_settings, port, "s3cret", log_path)
    try:
        await wait_until(lambda: answers(settings), timeout_s=60, interval_s=0.5)
        registry = Registry(pg_pool)
        candidate = ModelVersion(
            version_id=f"{ROUTE}-v2",
            route=ROUTE,
            base_model="SmolLM2-135M-Instruct",
            adapter=f"{ROUTE}-v2",
            upstream_url="http://127.0.0.1:9/v1",
            state="staged",
            parent_version=f"{ROUTE}-v1",
        )
        await registry.register_version(pg_pool, candidate)
        controller = RolloutController(registry, schema=pg_settings.db_schema)
        rollout = await controller.start(candidate, [5, 25, 50])
        first = await report(settings, f"{rollout.rollout_id}-s0")

        # Killed in the middle of step 1 (25%): no chance to clean anything up.
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        killed_with = process.returncode
        process = start_trainer(pg_settings, port, "s3cret", log_path)
        await wait_until(lambda: answers(settings), timeout_s=60, interval_s=0.5)
        stale = await report(settings, f"{rollout.rollout_id}-s0")
        resumed = await report(settings, f"{rollout.rollout_id}-s1")
    finally:
        process.terminate()
        process.wait(timeout=30)

    assert killed_with == -signal.SIGKILL
    assert (first.action, stale.action, resumed.action) == (
        "advanced",
        "ignored",
        "advanced",
    )
    table = await registry.routing_table()
    assert table.routes[ROUTE].experiment_id == f"{rollout.rollout_id}-s2"
    assert [v.weight_buckets for v in table.routes[ROUTE].variants] == [5000, 5000]
    stored = await registry.rollout(rollout.rollout_id)
    assert (stored.state, stored.step_index) == ("running", 2)
    assert process.returncode == 0, log_path.read_text()[-2000:]
