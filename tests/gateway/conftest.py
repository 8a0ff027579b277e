"""Fixtures for the gateway tests: a real upstream stub and gateways around it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from services.common.embedded import free_port
from services.common.events import EventModel
from services.common.routing import Route, RoutingTable, Variant
from services.gateway.app import App
from services.gateway.settings import GatewaySettings
from services.gateway.tables import StaticTableSource
from tests.gateway.upstream_stub import UpstreamStub

DEV_KEY = "fw-dev-key"
AUTH = {"Authorization": f"Bearer {DEV_KEY}"}


@pytest.fixture(scope="session")
async def upstream() -> AsyncIterator[UpstreamStub]:
    stub = UpstreamStub()
    await stub.start()
    yield stub
    await stub.stop()


def make_table(base_url: str) -> RoutingTable:
    """`support-bot` split 50/50 in an experiment, and a route to a closed port."""
    support = Route(
        name="support-bot",
        experiment_id="exp-1",
        variants=(
            Variant(
                "bot-v2",
                base_url,
                "smol",
                5000,
                adapter="lora-v2",
                model_version="mv-2",
                arm="treatment",
            ),
            Variant(
                "bot-v1", base_url, "smol", 5000, model_version="mv-1", arm="control"
            ),
        ),
    )
    dead = Route(
        name="dead-bot",
        variants=(
            Variant("dead-v1", f"http://127.0.0.1:{free_port()}/v1", "m", 10_000),
        ),
    )
    return RoutingTable(version=3, routes={"support-bot": support, "dead-bot": dead})


def make_settings(**overrides: Any) -> GatewaySettings:
    values: dict[str, Any] = {
        "port": 0,
        "pseudonym_key": "test-pseudonym-key",
        "upstream_timeout_s": 5.0,
    }
    values.update(overrides)
    return GatewaySettings(**values)


def queued(app: App) -> list[tuple[str, str, EventModel]]:
    """The events waiting in the publish queue (never started in unit tests)."""
    return [
        (item.topic, item.key.decode(), item.event)
        for item in app.publisher._queue._queue  # type: ignore[attr-defined]
    ]


@pytest.fixture
async def gateway(upstream: UpstreamStub) -> AsyncIterator[App]:
    """A gateway whose ASGI app is called in-process; its events stay queued."""
    app = App(make_settings(), tables=StaticTableSource(make_table(upstream.base_url)))
    yield app
    await app.close()


@pytest.fixture
async def client(gateway: App) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=gateway.asgi)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://gateway"
    ) as http:
        yield http
