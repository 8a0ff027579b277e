"""Routing table sources: a real in-test control-plane server, and a JSON file."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import orjson
import pytest
from grpc import aio

from services.common.control import TokenAuthInterceptor
from services.common.embedded import free_port
from services.common.pb.flywheel.v1 import control_pb2 as pb
from services.common.pb.flywheel.v1 import control_pb2_grpc as pb_grpc
from services.common.routing import RoutingTable
from services.common.settings import ControlPlaneSettings
from services.gateway.app import App
from services.gateway.settings import GatewaySettings
from services.gateway.tables import StaticTableSource, WatchedTableSource
from tests.conftest import wait_until
from tests.gateway.conftest import AUTH, make_settings, make_table
from tests.gateway.upstream_stub import UpstreamStub


class _RoutingService(pb_grpc.RoutingServiceServicer):
    """Serves a table and every later one put on its queue."""

    def __init__(self, table: RoutingTable) -> None:
        self.tables: asyncio.Queue[RoutingTable] = asyncio.Queue()
        self.tables.put_nowait(table)

    async def WatchRoutingTable(  # noqa: N802 - gRPC's method name
        self, request: pb.WatchRoutingTableRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.RoutingTable]:
        while True:
            yield (await self.tables.get()).to_proto()


async def test_gateway_follows_the_control_plane_table(upstream: UpstreamStub):
    port = free_port()
    service = _RoutingService(make_table(upstream.base_url))
    server = aio.server(interceptors=[TokenAuthInterceptor("t0ken")])
    pb_grpc.add_RoutingServiceServicer_to_server(service, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    control = ControlPlaneSettings(address=f"127.0.0.1:{port}", token="t0ken")
    tables = WatchedTableSource(control)
    app = App(make_settings(control=control), tables=tables)
    stop = asyncio.Event()
    watching = asyncio.create_task(tables.run(stop))
    transport = httpx.ASGITransport(app=app.asgi)
    try:
        await wait_until(lambda: tables.holds_table, timeout_s=10)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
            first = await http.get("/v1/models", headers=AUTH)
            newer = RoutingTable.from_json(
                {**make_table(upstream.base_url).to_json(), "version": 4}
            )
            newer.routes.pop("dead-bot")
            service.tables.put_nowait(newer)
            await wait_until(lambda: tables.table.version == 4, timeout_s=10)
            second = await http.get("/v1/models", headers=AUTH)
    finally:
        stop.set()
        await watching
        await server.stop(None)
        await app.close()

    assert [m["id"] for m in first.json()["data"]] == ["dead-bot", "support-bot"]
    assert [m["id"] for m in second.json()["data"]] == ["support-bot"]


def test_static_table_loads_from_a_json_file(tmp_path: Path):
    path = tmp_path / "routing.json"
    table = make_table("http://127.0.0.1:9/v1")
    path.write_bytes(orjson.dumps(table.to_json()))

    source = StaticTableSource.from_file(path)

    assert source.table == table and source.holds_table


def test_a_broken_table_file_fails_at_start(tmp_path: Path):
    path = tmp_path / "routing.json"
    path.write_text('{"version": 1}')

    with pytest.raises(ValueError, match="routing_table_file"):
        StaticTableSource.from_file(path)


def test_settings_read_the_environment(monkeypatch):
    monkeypatch.setenv("FLYWHEEL_GATEWAY_PORT", "9123")
    monkeypatch.setenv("FLYWHEEL_KAFKA__TOPIC_PREFIX", "envtest.")
    monkeypatch.setenv("FLYWHEEL_GATEWAY_UPSTREAM_TIMEOUT_S", "7")

    settings = GatewaySettings.load()

    assert settings.port == 9123
    assert settings.kafka.topic_prefix == "envtest."
    assert settings.upstream_timeout_s == 7
