"""The trainer's control plane on the real PostgreSQL: rollouts and the table watch."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc import aio

from services.common.control import auth_metadata, open_channel
from services.common.embedded import free_port
from services.common.pb.flywheel.v1 import control_pb2 as pb
from services.common.pb.flywheel.v1 import control_pb2_grpc as pb_grpc
from services.common.routing_client import RoutingTableWatcher
from services.common.settings import ControlPlaneSettings
from services.trainer.rollout import RolloutController
from services.trainer.server import TableBroadcast, start_control_server
from services.trainer.store import ModelVersion, Registry
from tests.conftest import wait_until

pytestmark = pytest.mark.integration

ROUTE = "bot"


@pytest.fixture
async def control_plane(pg_pool):
    settings = ControlPlaneSettings(address=f"127.0.0.1:{free_port()}", token="s3cret")
    registry = Registry(pg_pool)
    broadcast = TableBroadcast()
    schema = await pg_pool.fetchval("SELECT current_schema()")
    controller = RolloutController(registry, schema=schema, on_table=broadcast.publish)
    await controller.ensure_bootstrap(ROUTE, base_model="m", upstream_url="http://u/v1")
    host, port = settings.address.split(":")
    server = await start_control_server(
        settings, host=host, port=int(port), broadcast=broadcast, controller=controller
    )
    yield settings, registry, controller
    await server.stop(grace=0)


async def stage_candidate(registry: Registry, number: int = 2) -> ModelVersion:
    candidate = ModelVersion(
        version_id=f"{ROUTE}-v{number}",
        route=ROUTE,
        base_model="m",
        adapter=f"{ROUTE}-v{number}",
        upstream_url="http://u/v1",
        state="staged",
        parent_version=f"{ROUTE}-v1",
    )
    await registry.register_version(registry.pool, candidate)
    return candidate


def verdict(experiment_id: str, decision: int) -> pb.ExperimentVerdict:
    return pb.ExperimentVerdict(
        experiment_id=experiment_id,
        route=ROUTE,
        decision=decision,
        reason="test",
        lift=0.2,
        lift_low=0.1,
        lift_high=0.3,
        p_value=0.01,
    )


async def test_verdicts_walk_the_canary_through_its_steps_to_production(control_plane):
    settings, registry, controller = control_plane
    stop = asyncio.Event()
    watcher = RoutingTableWatcher(settings)
    watch = asyncio.create_task(watcher.watch_loop(stop))
    candidate = await stage_candidate(registry)

    rollout = await controller.start(candidate, [10, 50])
    await wait_until(
        lambda: (
            watcher.table.routes.get(ROUTE)
            and watcher.table.routes[ROUTE].experiment_id == rollout.experiment_id
        )
    )
    canary = watcher.table.routes[ROUTE]
    async with open_channel(settings) as channel:
        stub = pb_grpc.RolloutServiceStub(channel)
        meta = auth_metadata(settings)
        first = await stub.ReportVerdict(
            verdict(f"{rollout.rollout_id}-s0", pb.DECISION_PROMOTE), metadata=meta
        )
        stale = await stub.ReportVerdict(
            verdict(f"{rollout.rollout_id}-s0", pb.DECISION_PROMOTE), metadata=meta
        )
        second = await stub.ReportVerdict(
            verdict(f"{rollout.rollout_id}-s1", pb.DECISION_PROMOTE), metadata=meta
        )
    await wait_until(lambda: watcher.table.version == second.routing_version)
    stop.set()
    await watch

    assert [v.weight_buckets for v in canary.variants] == [1000, 9000]
    assert [v.arm for v in canary.variants] == ["treatment", "control"]
    assert (first.action, stale.action, second.action) == (
        "advanced",
        "ignored",
        "promoted",
    )
    final = watcher.table.routes[ROUTE]
    assert [v.name for v in final.variants] == [candidate.version_id]
    assert (await registry.production(ROUTE)).version_id == candidate.version_id
    actions = [d["action"] for d in await registry.decisions(ROUTE)]
    assert actions == ["started", "advanced", "promoted"]


async def test_roll_back_verdict_restores_the_baseline_at_once(control_plane):
    settings, registry, controller = control_plane
    candidate = await stage_candidate(registry)
    rollout = await controller.start(candidate, [5, 25])

    async with open_channel(settings) as channel:
        ack = await pb_grpc.RolloutServiceStub(channel).ReportVerdict(
            verdict(rollout.experiment_id, pb.DECISION_ROLL_BACK),
            metadata=auth_metadata(settings),
        )

    table = await registry.routing_table()
    assert ack.action == "rolled_back"
    assert [v.name for v in table.routes[ROUTE].variants] == [f"{ROUTE}-v1"]
    assert (await registry.version(candidate.version_id)).state == "rolled_back"


async def test_controller_restart_resumes_the_running_step(control_plane, pg_pool):
    settings, registry, controller = control_plane
    candidate = await stage_candidate(registry)
    rollout = await controller.start(candidate, [5, 25])
    schema = await pg_pool.fetchval("SELECT current_schema()")

    fresh = RolloutController(Registry(pg_pool), schema=schema)
    outcome = await fresh.on_verdict(
        ROUTE,
        {"experiment_id": rollout.experiment_id, "decision": "promote", "reason": "r"},
    )

    assert outcome.action == "advanced"
    table = await registry.routing_table()
    assert table.routes[ROUTE].variants[0].weight_buckets == 2500


async def test_calls_without_the_token_are_refused(control_plane):
    settings, _, _ = control_plane
    wrong = ControlPlaneSettings(address=settings.address, token="nope")

    async with open_channel(settings) as channel:
        with pytest.raises(aio.AioRpcError) as refused:
            await pb_grpc.RoutingServiceStub(channel).GetRoutingTable(
                pb.GetRoutingTableRequest(), metadata=auth_metadata(wrong)
            )
        with pytest.raises(aio.AioRpcError) as missing:
            await pb_grpc.RolloutServiceStub(channel).RollBack(
                pb.ManualActionRequest(route=ROUTE)
            )

    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_guardrail_breach_rolls_back_mid_rollout_and_records_the_numbers(
    control_plane,
):
    settings, registry, controller = control_plane
    candidate = await stage_candidate(registry)
    rollout = await controller.start(candidate, [5, 25, 50])
    breach = verdict(f"{rollout.rollout_id}-s1", pb.DECISION_ROLL_BACK)
    breach.reason = "guardrail: error rate 0.31 above 0.05"
    breach.srm_p_value = 0.4

    async with open_channel(settings) as channel:
        stub = pb_grpc.RolloutServiceStub(channel)
        meta = auth_metadata(settings)
        advanced = await stub.ReportVerdict(
            verdict(f"{rollout.rollout_id}-s0", pb.DECISION_PROMOTE), metadata=meta
        )
        rolled = await stub.ReportVerdict(breach, metadata=meta)
        late = await stub.ReportVerdict(
            verdict(f"{rollout.rollout_id}-s1", pb.DECISION_PROMOTE), metadata=meta
        )

    assert (advanced.action, rolled.action, late.action) == (
        "advanced",
        "rolled_back",
        "ignored",
    )
    table = await registry.routing_table()
    assert table.version == rolled.routing_version
    assert [v.name for v in table.routes[ROUTE].variants] == [f"{ROUTE}-v1"]
    assert (await registry.version(candidate.version_id)).state == "rolled_back"
    assert (await registry.rollout(rollout.rollout_id)).state == "rolled_back"
    last = (await registry.decisions(ROUTE))[-1]
    assert (last["action"], last["source"]) == ("rolled_back", "analyzer")
    assert last["reason"] == breach.reason
    assert last["verdict"]["lift"] == 0.2
    assert last["verdict"]["srm_p_value"] == 0.4
    assert last["routing_version"] == rolled.routing_version


async def test_watchers_keep_the_last_table_while_the_controller_is_away(pg_pool):
    settings = ControlPlaneSettings(address=f"127.0.0.1:{free_port()}", token="t0k")
    host, port = settings.address.split(":")
    registry = Registry(pg_pool)
    schema = await pg_pool.fetchval("SELECT current_schema()")

    async def serve() -> tuple[aio.Server, RolloutController]:
        broadcast = TableBroadcast()
        controller = RolloutController(
            registry, schema=schema, on_table=broadcast.publish
        )
        await broadcast.publish(await registry.routing_table())
        server = await start_control_server(
            settings,
            host=host,
            port=int(port),
            broadcast=broadcast,
            controller=controller,
        )
        return server, controller

    first_server, controller = await serve()
    await controller.ensure_bootstrap(ROUTE, base_model="m", upstream_url="http://u/v1")
    stop = asyncio.Event()
    watcher = RoutingTableWatcher(
        settings.model_copy(update={"reconnect_max_backoff_s": 0.5})
    )
    watch = asyncio.create_task(watcher.watch_loop(stop))
    held = await watcher.wait_ready(timeout_s=10)

    await first_server.stop(grace=0)
    await wait_until(lambda: not watcher.connected, timeout_s=10)
    while_away = watcher.table
    candidate = await stage_candidate(registry)
    await RolloutController(registry, schema=schema).start(candidate, [10])
    second_server, _ = await serve()
    await wait_until(lambda: watcher.table.version > held.version, timeout_s=20)
    stop.set()
    await watch
    await second_server.stop(grace=0)

    assert while_away == held
    assert watcher.table.routes[ROUTE].variants[0].name == candidate.version_id
