"""The gateway's own HTTP protocol over a real socket: chat completions without ASGI.

The server is uvicorn with `GatewayProtocol`, as `App` serves it; events stay queued
(no broker). Every other path must still reach the Starlette app.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
import uvicorn

from services.common.embedded import free_port
from services.common.events import Interaction
from services.gateway.app import App
from services.gateway.server import GatewayProtocol, _ChatExchange
from services.gateway.tables import StaticTableSource
from services.gateway.upstream_http import UpstreamResponse
from tests.conftest import wait_until
from tests.gateway.conftest import AUTH, make_settings, make_table, queued
from tests.gateway.upstream_stub import UpstreamStub


def interactions(app: App) -> list[Interaction]:
    return [event for _, _, event in queued(app) if isinstance(event, Interaction)]


def chat_body(content: str = "hello", **extra: object) -> dict[str, Any]:
    return {
        "model": "support-bot",
        "messages": [{"role": "user", "content": content}],
        **extra,
    }


class Served:
    """A gateway App's ASGI app behind uvicorn with the gateway's protocol."""

    def __init__(self, app: App, server: uvicorn.Server) -> None:
        self.app = app
        self.server = server
        self.port: int = server.config.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.asynccontextmanager
async def serve(
    upstream: UpstreamStub, *, http: Any = GatewayProtocol, **settings: Any
) -> AsyncIterator[Served]:
    """Serve an App; `http="httptools"` is uvicorn's own protocol (chat over ASGI)."""
    app = App(
        make_settings(**settings),
        tables=StaticTableSource(make_table(upstream.base_url)),
    )
    config = uvicorn.Config(
        app.asgi,
        host="127.0.0.1",
        port=free_port(),
        lifespan="off",
        log_config=None,
        proxy_headers=False,  # as App serves it: the app is not wrapped
        http=http,
        timeout_graceful_shutdown=1,
    )
    config.load()
    # The protocol finds the chat endpoint on the app: no ASGI for chat calls.
    assert getattr(config.loaded_app, "chat", None) is app.api.chat
    server = uvicorn.Server(config)
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
    serving = asyncio.create_task(server.serve())
    await wait_until(lambda: server.started)
    try:
        yield Served(app, server)
    finally:
        upstream.release_hang.set()
        server.should_exit = True
        await serving
        await app.close()
        upstream.release_hang.clear()


@pytest.fixture
async def served(upstream: UpstreamStub) -> AsyncIterator[Served]:
    async with serve(upstream) as gateway:
        yield gateway


async def raw_exchange(port: int, data: bytes, *, responses: int = 1) -> bytes:
    """Write `data` on one connection; read until `responses` answers came back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        received = b""
        while received.count(b"HTTP/1.1 ") < responses or not _complete(received):
            chunk = await asyncio.wait_for(reader.read(65536), 10)
            if not chunk:
                break
            received += chunk
        return received
    finally:
        writer.close()


def _complete(received: bytes) -> bool:
    """Whether the last response in `received` is whole (Content-Length bodies)."""
    head, _, body = received.rpartition(b"HTTP/1.1 ")[2].partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            return len(body) >= int(value)
    return bool(_)


def raw_chat(body: dict[str, Any], *, extra: bytes = b"") -> bytes:
    payload = orjson.dumps(body)
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\n"
        b"authorization: " + AUTH["Authorization"].encode() + b"\r\n"
        b"content-type: application/json\r\n"
        b"content-length: %d\r\n" % len(payload) + extra + b"\r\n" + payload
    )


async def test_completion_is_answered_and_recorded_over_a_kept_alive_connection(
    served: Served,
):
    async with httpx.AsyncClient(base_url=served.url, trust_env=False) as http:
        first = await http.post(
            "/v1/chat/completions", json=chat_body("one", user="u-1"), headers=AUTH
        )
        second = await http.post(
            "/v1/chat/completions", json=chat_body("two"), headers=AUTH
        )

    assert first.status_code == 200 and second.status_code == 200
    assert first.headers["content-type"] == "application/json"
    body = first.json()
    assert body["id"] == first.headers["x-flywheel-interaction-id"]
    assert body["choices"][0]["message"]["content"] == "You said: one"
    assert first.headers.get("connection") != "close"
    events = interactions(served.app)
    assert [str(event.interaction_id) for event in events] == [
        body["id"],
        second.json()["id"],
    ]
    assert events[0].response_text == "You said: one"
    assert events[0].user_id is not None and events[0].user_id != "u-1"
    # Both went over one connection (keep-alive) and one request each.
    assert served.server.server_state.total_requests == 2


async def test_stream_relays_every_chunk_with_the_interaction_id(served: Served):
    body = chat_body(
        "the quick brown fox", stream=True, stream_options={"include_usage": True}
    )
    async with (
        httpx.AsyncClient(base_url=served.url, trust_env=False) as http,
        http.stream("POST", "/v1/chat/completions", json=body, headers=AUTH) as answer,
    ):
        lines = [line async for line in answer.aiter_lines() if line]
        interaction_id = answer.headers["x-flywheel-interaction-id"]
        content_type = answer.headers["content-type"]

    assert content_type == "text/event-stream; charset=utf-8"
    assert lines[-1] == "data: [DONE]"
    chunks = [orjson.loads(line[6:]) for line in lines[:-1]]
    assert {chunk["id"] for chunk in chunks} == {interaction_id}
    text = "".join(
        choice["delta"].get("content") or ""
        for chunk in chunks
        for choice in chunk["choices"]
    )
    assert text == "You said: the quick brown fox"
    assert chunks[-1]["usage"]["completion_tokens"] == 6
    [event] = interactions(served.app)
    assert str(event.interaction_id) == interaction_id
    assert event.stream and event.response_text == text and event.error is None


async def test_client_leaving_mid_stream_is_recorded_at_once(served: Served):
    body = chat_body("slow-stream", stream=True)
    async with (
        httpx.AsyncClient(base_url=served.url, trust_env=False) as http,
        http.stream("POST", "/v1/chat/completions", json=body, headers=AUTH) as answer,
    ):
        async for line in answer.aiter_lines():
            if '"You' in line:
                break

    # The upstream still holds its stream open: the gateway must notice by itself.
    [event] = await wait_until(lambda: interactions(served.app), timeout_s=10)
    assert event.error is not None and event.error.type == "client_disconnected"
    assert event.response_text == "You"


async def test_other_paths_and_methods_go_through_the_app(served: Served):
    async with httpx.AsyncClient(base_url=served.url, trust_env=False) as http:
        models = await http.get("/v1/models", headers=AUTH)
        wrong_method = await http.get("/v1/chat/completions", headers=AUTH)
        unknown = await http.post("/v1/chat/completions/", json={}, headers=AUTH)

    assert models.status_code == 200
    assert [model["id"] for model in models.json()["data"]] == [
        "dead-bot",
        "support-bot",
    ]
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"]["code"] == "method_not_allowed"
    assert unknown.status_code == 404
    assert interactions(served.app) == []


async def test_errors_come_in_openai_shape(served: Served):
    async with httpx.AsyncClient(base_url=served.url, trust_env=False) as http:
        no_key = await http.post("/v1/chat/completions", json=chat_body())
        bad_json = await http.post(
            "/v1/chat/completions", content=b"{nope", headers=AUTH
        )
        upstream_failed = await http.post(
            "/v1/chat/completions", json=chat_body("fail:400"), headers=AUTH
        )

    assert no_key.status_code == 401
    assert no_key.json()["error"]["type"] == "invalid_request_error"
    assert bad_json.status_code == 400
    assert "not valid JSON" in bad_json.json()["error"]["message"]
    assert upstream_failed.status_code == 400
    interaction_id = upstream_failed.headers["x-flywheel-interaction-id"]
    [event] = interactions(served.app)
    assert str(event.interaction_id) == interaction_id
    assert event.error is not None


async def test_a_body_past_the_limit_is_refused_before_it_is_all_sent(
    upstream: UpstreamStub,
):
    async with serve(upstream, max_body_bytes=2048) as served:
        big = chat_body("x" * 5000)
        declared = await raw_exchange(served.port, raw_chat(big))
        # No Content-Length: the limit is found while the body arrives.
        payload = orjson.dumps(big)
        chunked = (
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\n"
            b"authorization: " + AUTH["Authorization"].encode() + b"\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
            b"%x\r\n%b\r\n" % (len(payload), payload)
        )
        streamed = await raw_exchange(served.port, chunked)

        # Refused before the body was sent (Expect: 100-continue, say): the
        # connection closes, or the body would be read as the next request.
        expecting = raw_chat(big, extra=b"expect: 100-continue\r\n")
        early = await raw_exchange(served.port, expecting[: -len(payload)])

    assert early.startswith(b"HTTP/1.1 413 ")
    assert b"connection: close\r\n" in early.partition(b"\r\n\r\n")[0]
    for answer in (declared, streamed):
        assert answer.startswith(b"HTTP/1.1 413 ")
        body = orjson.loads(answer.partition(b"\r\n\r\n")[2])
        assert "larger than 2048 bytes" in body["error"]["message"]
    assert interactions(served.app) == []


async def test_expect_continue_is_answered_before_the_body(served: Served):
    payload = orjson.dumps(chat_body("patient"))
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    try:
        head = raw_chat(chat_body("patient"), extra=b"expect: 100-continue\r\n")
        writer.write(head[: -len(payload)])
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        writer.write(payload)
        answer = await asyncio.wait_for(reader.readuntil(b"}]"), 10)
    finally:
        writer.close()

    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert b"You said: patient" in answer


async def test_pipelined_requests_are_answered_in_order(served: Served):
    requests = (
        raw_chat(chat_body("first"))
        + b"GET /livez HTTP/1.1\r\nhost: gw\r\n\r\n"
        + raw_chat(chat_body("third"))
    )

    received = await raw_exchange(served.port, requests, responses=3)

    answers = received.split(b"HTTP/1.1 ")[1:]
    assert len(answers) == 3
    assert b"You said: first" in answers[0]
    assert b'"status":"ok"' in answers[1]
    assert b"You said: third" in answers[2]
    assert [event.response_text for event in interactions(served.app)] == [
        "You said: first",
        "You said: third",
    ]


def prompts_sent(upstream: UpstreamStub) -> list[str]:
    return [request["body"]["messages"][-1]["content"] for request in upstream.requests]


async def test_client_that_leaves_cancels_its_call_at_once(
    served: Served, upstream: UpstreamStub
):
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    writer.write(raw_chat(chat_body("hang")))
    await wait_until(lambda: served.app.api.chat._open, timeout_s=10)
    writer.close()

    # Recorded at once as cancelled, while the upstream still holds its answer.
    [event] = await wait_until(lambda: interactions(served.app), timeout_s=3)

    assert event.error is not None and event.error.type == "cancelled"
    assert not upstream.release_hang.is_set()


async def test_call_pipelined_behind_a_client_that_left_never_runs(
    served: Served, upstream: UpstreamStub
):
    sent_before = len(upstream.requests)
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    writer.write(raw_chat(chat_body("hang")) + raw_chat(chat_body("behind")))
    await wait_until(lambda: served.app.api.chat._open, timeout_s=10)
    writer.close()
    await asyncio.sleep(0.2)
    upstream.release_hang.set()  # the first call ends; the one behind has no client

    await wait_until(lambda: interactions(served.app), timeout_s=10)
    await asyncio.sleep(0.3)  # time for a wrongly started pipelined call to show

    assert "behind" not in prompts_sent(upstream)[sent_before:]
    assert len(interactions(served.app)) == 1


async def test_stream_cut_by_the_shutdown_is_recorded_as_the_gateway_s(
    upstream: UpstreamStub,
):
    async with serve(upstream) as served:
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        writer.write(raw_chat(chat_body("slow-stream", stream=True)))
        await asyncio.wait_for(reader.readuntil(b"You"), 10)
        # As App does when it stops serving; the grace (1 s) then runs out.
        served.app.api.chat.stopping = True
        served.server.should_exit = True
        [event] = await wait_until(lambda: interactions(served.app), timeout_s=10)
        writer.close()

    assert event.error is not None and event.error.type == "gateway_shutdown"
    assert event.response_text == "You"


async def test_http_1_0_connection_is_closed_after_the_answer(served: Served):
    request = raw_chat(chat_body("old")).replace(b"HTTP/1.1", b"HTTP/1.0", 1)
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    try:
        writer.write(request)
        received = await asyncio.wait_for(reader.read(), 10)  # until closed
    finally:
        writer.close()

    assert received.startswith(b"HTTP/1.1 200 ")
    assert b"connection: close\r\n" in received.partition(b"\r\n\r\n")[0]


async def test_shutdown_lets_a_call_in_flight_finish_and_records_it(
    upstream: UpstreamStub,
):
    async with (
        serve(upstream) as served,
        httpx.AsyncClient(base_url=served.url, trust_env=False) as http,
    ):
        call = asyncio.create_task(
            http.post("/v1/chat/completions", json=chat_body("hang"), headers=AUTH)
        )
        await wait_until(lambda: served.app.api.chat._open, timeout_s=10)
        served.server.should_exit = True
        await asyncio.sleep(0.3)
        upstream.release_hang.set()
        answer = await asyncio.wait_for(call, 10)

    assert answer.status_code == 200
    assert answer.headers["connection"] == "close"
    [event] = interactions(served.app)
    assert event.error is None and event.response_text == "You said: hang"


async def test_shutdown_past_its_grace_records_the_cut_call(upstream: UpstreamStub):
    async with serve(upstream) as served:
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        writer.write(raw_chat(chat_body("hang")))
        await wait_until(lambda: served.app.api.chat._open, timeout_s=10)
        served.server.should_exit = True  # grace: 1 s, the upstream never answers
        await wait_until(lambda: interactions(served.app), timeout_s=10)
        writer.close()

    [event] = interactions(served.app)
    assert event.error is not None and event.error.type == "cancelled"
    assert await served.app.api.chat.settle(0.1) == 0


async def test_served_calls_leave_no_reference_cycles(served: Served):
    # Objects in a cycle wait for the garbage collector, whose pauses are the
    # gateway's slowest answers: a call's exchange and upstream response must be
    # freed as soon as the call is over.
    async with httpx.AsyncClient(base_url=served.url, trust_env=False) as http:
        await http.post("/v1/chat/completions", json=chat_body("warm"), headers=AUTH)
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for stream in (False, True, False, True):
                answer = await http.post(
                    "/v1/chat/completions",
                    json=chat_body("hello", stream=stream),
                    headers=AUTH,
                )
                assert answer.status_code == 200
            gc.collect()
            cyclic = [
                type(item).__name__
                for item in gc.garbage
                if isinstance(item, _ChatExchange | UpstreamResponse)
            ]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()

    assert cyclic == []
