"""The trainer's gRPC control plane: the routing table (get and watch) and rollouts."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from grpc import aio

from services.common.control import TokenAuthInterceptor, server_credentials
from services.common.lifecycle import sleep_or_stop
from services.common.pb.flywheel.v1 import control_pb2 as pb
from services.common.pb.flywheel.v1 import control_pb2_grpc as pb_grpc
from services.common.routing import RoutingTable
from services.common.settings import ControlPlaneSettings
from services.trainer.rollout import Outcome, RolloutController
from services.trainer.store import Registry

logger = logging.getLogger(__name__)

DECISIONS = {
    pb.DECISION_CONTINUE: "continue",
    pb.DECISION_PROMOTE: "promote",
    pb.DECISION_ROLL_BACK: "roll_back",
}


class TableBroadcast:
    """The newest routing table, and a way to wait for a newer one."""

    def __init__(self) -> None:
        self.table = RoutingTable(version=0)
        self._changed = asyncio.Condition()

    async def publish(self, table: RoutingTable) -> None:
        async with self._changed:
            if table.version > self.table.version:
                self.table = table
                self._changed.notify_all()

    async def wait_newer(self, version: int) -> RoutingTable:
        async with self._changed:
            await self._changed.wait_for(lambda: self.table.version > version)
            return self.table


class RoutingServicer(pb_grpc.RoutingServiceServicer):  # type: ignore[misc]  # untyped
    """Serves the routing table; watchers get every new version as it is written."""

    def __init__(self, broadcast: TableBroadcast) -> None:
        self._broadcast = broadcast

    async def GetRoutingTable(  # noqa: N802 - gRPC method name
        self, request: pb.GetRoutingTableRequest, context: aio.ServicerContext
    ) -> pb.RoutingTable:
        return self._broadcast.table.to_proto()

    async def WatchRoutingTable(  # noqa: N802 - gRPC method name
        self, request: pb.WatchRoutingTableRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.RoutingTable]:
        known = request.known_version
        while True:
            table = await self._broadcast.wait_newer(known)
            known = table.version
            yield table.to_proto()


class RolloutServicer(pb_grpc.RolloutServiceServicer):  # type: ignore[misc]  # untyped
    """Takes the analyzer's verdicts and manual promote / roll-back calls."""

    def __init__(self, controller: RolloutController) -> None:
        self._controller = controller

    async def ReportVerdict(  # noqa: N802 - gRPC method name
        self, request: pb.ExperimentVerdict, context: aio.ServicerContext
    ) -> pb.VerdictAck:
        verdict: dict[str, Any] = MessageToDict(
            request, preserving_proto_field_name=True
        )
        verdict["decision"] = DECISIONS.get(request.decision, "continue")
        outcome = await self._controller.on_verdict(request.route, verdict)
        return _ack(outcome)

    async def Promote(  # noqa: N802 - gRPC method name
        self, request: pb.ManualActionRequest, context: aio.ServicerContext
    ) -> pb.VerdictAck:
        return await self._manual(self._controller.promote, request, context)

    async def RollBack(  # noqa: N802 - gRPC method name
        self, request: pb.ManualActionRequest, context: aio.ServicerContext
    ) -> pb.VerdictAck:
        return await self._manual(self._controller.roll_back, request, context)

    async def _manual(
        self,
        action: Callable[[str, str], Awaitable[Outcome]],
        request: pb.ManualActionRequest,
        context: aio.ServicerContext,
    ) -> pb.VerdictAck:
        """A promote or roll-back by hand; no running rollout is FAILED_PRECONDITION."""
        try:
            outcome = await action(request.route, request.reason or "manual")
        except LookupError as error:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))
        return _ack(outcome)


def _ack(outcome: Outcome) -> pb.VerdictAck:
    return pb.VerdictAck(action=outcome.action, routing_version=outcome.routing_version)


async def start_control_server(
    settings: ControlPlaneSettings,
    *,
    host: str,
    port: int,
    broadcast: TableBroadcast,
    controller: RolloutController,
) -> aio.Server:
    """Start the authenticated gRPC server; the caller stops it."""
    server = aio.server(
        interceptors=[TokenAuthInterceptor(settings.token.get_secret_value())],
        # Watchers ping every 10 s to notice a dead controller quickly; without these
        # the server answers such pings with GOAWAY "too_many_pings".
        options=[
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
            ("grpc.http2.max_ping_strikes", 0),
        ],
    )
    pb_grpc.add_RoutingServiceServicer_to_server(RoutingServicer(broadcast), server)
    pb_grpc.add_RolloutServiceServicer_to_server(RolloutServicer(controller), server)
    credentials = server_credentials(settings)
    address = f"{host}:{port}"
    if credentials is None:
        server.add_insecure_port(address)
    else:
        server.add_secure_port(address, credentials)
    await server.start()
    logger.info("control plane listening address=%s tls=%s", address, settings.tls)
    return server


async def follow_database_loop(
    registry: Registry,
    broadcast: TableBroadcast,
    stop: asyncio.Event,
    interval_s: float = 2.0,
) -> None:
    """Pick up routing tables written by other processes (another replica, say)."""
    while not stop.is_set():
        try:
            await broadcast.publish(await registry.routing_table())
        except (TimeoutError, OSError) as error:
            logger.warning("routing table refresh failed: %r", error)
        await sleep_or_stop(stop, interval_s)
