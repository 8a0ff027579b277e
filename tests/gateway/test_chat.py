"""Chat completions through the gateway against a real local upstream stub."""

from __future__ import annotations

import httpx
import orjson

from services.common.events import Interaction
from services.common.routing import bucket_of
from services.gateway.app import App
from services.gateway.handlers import pseudonymize
from services.gateway.tables import StaticTableSource
from tests.conftest import wait_until
from tests.gateway.conftest import AUTH, make_settings, make_table, queued
from tests.gateway.test_server import serve
from tests.gateway.upstream_stub import UpstreamStub

PII_PROMPT = "I am ana@example.org, call me on +44 20 7946 0958"


def chat_body(content: str = "hello", **extra: object) -> dict[str, object]:
    return {
        "model": "support-bot",
        "messages": [{"role": "user", "content": content}],
        **extra,
    }


def interactions(app: App) -> list[Interaction]:
    return [event for topic, _, event in queued(app) if isinstance(event, Interaction)]


async def test_completion_answers_with_interaction_id_in_body_and_header(
    client: httpx.AsyncClient, gateway: App
):
    response = await client.post(
        "/v1/chat/completions", json=chat_body(user="u-1"), headers=AUTH
    )

    assert response.status_code == 200
    body = response.json()
    assert body["choices"][0]["message"]["content"] == "You said: hello"
    assert body["id"] == response.headers["x-flywheel-interaction-id"]
    [event] = interactions(gateway)
    assert str(event.interaction_id) == body["id"]
    assert event.response_text == "You said: hello"
    assert event.usage.total_tokens == body["usage"]["total_tokens"]
    assert event.finish_reason == "stop"


async def test_variant_is_sticky_and_upstream_gets_its_model_and_unknown_fields(
    client: httpx.AsyncClient, gateway: App, upstream: UpstreamStub
):
    route = gateway.tables.table.routes["support-bot"]
    expected = route.assign(bucket_of("support-bot", "user-42"))
    body = chat_body(user="user-42", temperature=0.2, vendor_knob={"x": 1})

    for _ in range(3):
        response = await client.post("/v1/chat/completions", json=body, headers=AUTH)
        assert response.status_code == 200

    sent = upstream.requests[-1]["body"]
    assert sent["model"] == expected.upstream_model
    assert sent["vendor_knob"] == {"x": 1}
    assert sent["temperature"] == 0.2
    events = interactions(gateway)
    assert {event.variant for event in events} == {expected.name}
    assert events[0].arm == expected.arm
    assert events[0].experiment_id == "exp-1"
    assert events[0].bucket == bucket_of("support-bot", "user-42")
    assert events[0].request_params["vendor_knob"] == {"x": 1}


async def test_event_is_masked_and_pseudonymous_but_the_answer_is_not(
    client: httpx.AsyncClient, gateway: App
):
    response = await client.post(
        "/v1/chat/completions",
        json=chat_body(
            PII_PROMPT, user="ana", metadata={"ticket": "mail ana@example.org"}
        ),
        headers={**AUTH, "X-Flywheel-Session": "sess-9"},
    )

    assert "ana@example.org" in response.json()["choices"][0]["message"]["content"]
    [event] = interactions(gateway)
    wire = event.model_dump_json()
    assert "ana@example.org" not in wire and "7946" not in wire
    assert '"ana"' not in wire and "sess-9" not in wire
    assert event.request_messages[0].content == "I am [EMAIL], call me on [PHONE]"
    assert event.response_text == "You said: I am [EMAIL], call me on [PHONE]"
    assert event.user_id == pseudonymize(b"test-pseudonym-key", "user", "ana")
    assert event.session_id == pseudonymize(b"test-pseudonym-key", "session", "sess-9")
    assert event.metadata == {"ticket": "mail [EMAIL]"}
    assert "user" not in event.request_params


async def test_user_header_is_used_when_the_body_has_no_user(
    client: httpx.AsyncClient, gateway: App
):
    await client.post(
        "/v1/chat/completions",
        json=chat_body(),
        headers={**AUTH, "X-Flywheel-User": "bob"},
    )

    [event] = interactions(gateway)
    assert event.user_id == pseudonymize(b"test-pseudonym-key", "user", "bob")
    assert event.bucket == bucket_of("support-bot", "bob")


async def test_stream_relays_chunks_and_strips_usage_the_client_did_not_ask_for(
    client: httpx.AsyncClient, gateway: App, upstream: UpstreamStub
):
    response = await client.post(
        "/v1/chat/completions", json=chat_body("stream me", stream=True), headers=AUTH
    )

    chunks = _data_chunks(response.text)
    assert response.status_code == 200
    assert response.text.rstrip().endswith("data: [DONE]")
    assert all("usage" not in chunk for chunk in chunks)
    interaction_id = response.headers["x-flywheel-interaction-id"]
    assert {chunk["id"] for chunk in chunks} == {interaction_id}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == "You said: stream me"
    assert upstream.requests[-1]["body"]["stream_options"] == {"include_usage": True}
    [event] = interactions(gateway)
    assert event.stream and event.response_text == "You said: stream me"
    assert event.usage.completion_tokens == 4
    assert event.time_to_first_token_s is not None
    assert event.time_to_first_token_s <= event.latency_s


async def test_stream_keeps_usage_when_the_client_asked(client: httpx.AsyncClient):
    body = chat_body("count me", stream=True, stream_options={"include_usage": True})

    response = await client.post("/v1/chat/completions", json=body, headers=AUTH)

    usage_chunks = [c for c in _data_chunks(response.text) if c.get("usage")]
    assert len(usage_chunks) == 1
    assert usage_chunks[0]["usage"]["completion_tokens"] == 4


async def test_stream_cut_off_by_upstream_is_recorded_as_failed(
    client: httpx.AsyncClient, gateway: App
):
    response = await client.post(
        "/v1/chat/completions",
        json=chat_body("broken-stream", stream=True),
        headers=AUTH,
    )

    assert '"upstream_unreachable"' in response.text
    [event] = interactions(gateway)
    assert event.error is not None and event.error.type == "upstream_unreachable"
    assert event.response_text == "You said:"


async def test_upstream_error_keeps_its_status_in_openai_shape(
    client: httpx.AsyncClient, gateway: App
):
    response = await client.post(
        "/v1/chat/completions", json=chat_body("fail:503"), headers=AUTH
    )

    assert response.status_code == 503
    assert response.json()["error"]["message"] == "stub failure 503"
    assert response.json()["error"]["code"] == "stub_failure"
    # Both variants fail: the routed one's try, then the fallback's answer.
    failed, event = interactions(gateway)
    assert failed.error is not None and failed.error.status_code == 503
    assert event.error is not None and event.error.status_code == 503
    assert str(event.interaction_id) == response.headers["x-flywheel-interaction-id"]


async def test_streamed_request_upstream_error_is_not_a_stream(
    client: httpx.AsyncClient,
):
    response = await client.post(
        "/v1/chat/completions", json=chat_body("fail:429", stream=True), headers=AUTH
    )

    assert response.status_code == 429
    assert response.json()["error"]["type"] == "server_error"


async def test_unreachable_upstream_answers_502(
    client: httpx.AsyncClient, gateway: App
):
    body = {**chat_body(), "model": "dead-bot"}

    response = await client.post("/v1/chat/completions", json=body, headers=AUTH)

    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_unreachable"
    [event] = interactions(gateway)
    assert event.variant == "dead-v1" and event.error is not None


async def test_upstream_timeout_answers_504(upstream: UpstreamStub):
    app = App(
        make_settings(upstream_timeout_s=0.3),
        tables=StaticTableSource(make_table(upstream.base_url)),
    )
    transport = httpx.ASGITransport(app=app.asgi)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
        response = await http.post(
            "/v1/chat/completions", json=chat_body("hang"), headers=AUTH
        )
    await app.close()

    assert response.status_code == 504
    assert response.json()["error"]["code"] == "upstream_timeout"


def _data_chunks(text: str) -> list[dict[str, object]]:
    return [
        orjson.loads(line[6:])
        for line in text.splitlines()
        if line.startswith("data: ") and line != "data: [DONE]"
    ]


async def test_client_leaving_mid_stream_is_recorded_once(upstream: UpstreamStub):
    # Over ASGI (uvicorn's own protocol); tests/gateway/test_server.py has the
    # gateway's protocol.
    async with serve(upstream, http="httptools") as served:
        app = served.app
        url = f"{served.url}/v1/chat/completions"
        async with httpx.AsyncClient(trust_env=False) as http:
            body = chat_body("slow-stream", stream=True)
            async with http.stream("POST", url, json=body, headers=AUTH) as response:
                async for line in response.aiter_lines():
                    if '"You' in line:
                        break
        await wait_until(lambda: interactions(app), timeout_s=10)

    [event] = interactions(app)
    assert event.error is not None and event.error.type == "client_disconnected"
    assert event.response_text == "You"
