"""Every routed call becomes exactly one event: long answers, broken chunks,
cancelled requests and a shutdown that cuts calls off."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.requests import Request

from services.common.events import MAX_TEXT_CHARS, Interaction
from services.gateway.app import App
from services.gateway.handlers import TRUNCATED_KEY
from tests.gateway.conftest import AUTH, queued
from tests.gateway.upstream_stub import UpstreamStub


def interactions(app: App) -> list[Interaction]:
    return [event for _, _, event in queued(app) if isinstance(event, Interaction)]


def body(prompt: str, **extra: object) -> dict[str, object]:
    return {
        "model": "support-bot",
        "messages": [{"role": "user", "content": prompt}],
        **extra,
    }


@pytest.mark.parametrize("stream", [False, True])
async def test_an_answer_longer_than_an_event_allows_is_published_cut(
    client: httpx.AsyncClient, gateway: App, stream: bool
):
    length = MAX_TEXT_CHARS + 5_000

    response = await client.post(
        "/v1/chat/completions",
        json=body(f"long:{length}", stream=stream, metadata={"ticket": "T-1"}),
        headers=AUTH,
    )

    assert response.status_code == 200
    assert ("a" * length) in response.text  # the client gets all of it
    [event] = interactions(gateway)
    assert event.response_text == "a" * MAX_TEXT_CHARS
    assert event.metadata == {"ticket": "T-1", TRUNCATED_KEY: "response_text"}


async def test_a_stream_chunk_that_is_not_json_ends_the_stream_with_an_error(
    client: httpx.AsyncClient, gateway: App
):
    response = await client.post(
        "/v1/chat/completions", json=body("bad-chunk", stream=True), headers=AUTH
    )

    assert "{not json" not in response.text
    assert '"bad_upstream_response"' in response.text
    [event] = interactions(gateway)
    assert event.error is not None and event.error.type == "bad_upstream_response"


async def test_a_trailing_slash_is_an_unknown_path_not_a_redirect(
    client: httpx.AsyncClient,
):
    response = await client.post(
        "/v1/chat/completions/", json=body("hello"), headers=AUTH
    )

    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


@pytest.fixture
async def hanging(upstream: UpstreamStub) -> AsyncIterator[None]:
    yield
    # Let the stub's hung handlers end, then arm the next hang.
    upstream.release_hang.set()
    await asyncio.sleep(0.05)
    upstream.release_hang.clear()


@pytest.mark.parametrize("stream", [False, True])
async def test_a_request_cancelled_while_upstream_works_is_recorded_once(
    client: httpx.AsyncClient, gateway: App, hanging: None, stream: bool
):
    request = asyncio.create_task(
        client.post(
            "/v1/chat/completions", json=body("hang", stream=stream), headers=AUTH
        )
    )
    await asyncio.sleep(0.3)

    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request

    [event] = interactions(gateway)
    assert event.error is not None and event.error.type == "cancelled"
    assert await gateway.api.chat.settle(0.1) == 0


async def test_settle_records_a_stream_whose_response_never_started(
    gateway: App, upstream: UpstreamStub
):
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "headers": [(b"authorization", AUTH["Authorization"].encode())],
    }
    payload = httpx.Request("POST", "http://x", json=body("hello", stream=True)).read()

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": payload, "more_body": False}

    # The response exists, but the server stops before it is sent.
    await gateway.api.chat.handle(Request(scope, receive))
    assert interactions(gateway) == []

    assert await gateway.api.chat.settle(0.1) == 1

    [event] = interactions(gateway)
    assert event.error is not None and event.error.type == "gateway_shutdown"


async def test_a_stream_the_client_left_before_it_started_is_recorded_once(
    gateway: App,
):
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "method": "POST",
        "path": "/v1/chat/completions",
        "headers": [(b"authorization", AUTH["Authorization"].encode())],
    }
    payload = httpx.Request("POST", "http://x", json=body("hello", stream=True)).read()
    incoming = [{"type": "http.request", "body": payload, "more_body": False}]

    async def receive() -> dict[str, object]:
        # The body, then at once the client is gone.
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: dict[str, object]) -> None:
        # A slow client socket: the disconnect is noticed before the first chunk.
        await asyncio.sleep(0.2)

    await gateway.asgi(scope, receive, send)

    [event] = interactions(gateway)
    assert event.error is not None and event.error.type == "client_disconnected"
    assert await gateway.api.chat.settle(0.1) == 0
