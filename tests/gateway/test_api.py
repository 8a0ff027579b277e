"""Authentication, error shapes, request validation and the side endpoints."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import pytest

from services.common.events import Feedback, FeedbackKind, Interaction
from services.common.routing import RoutingTable
from services.gateway.app import App
from services.gateway.handlers import pseudonymize
from services.gateway.metrics import REGISTRY
from services.gateway.settings import hash_api_key
from services.gateway.tables import StaticTableSource
from tests.certificates import self_signed
from tests.gateway.conftest import AUTH, make_settings, make_table, queued
from tests.gateway.upstream_stub import UpstreamStub

CHAT = {"model": "support-bot", "messages": [{"role": "user", "content": "hi"}]}


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None):
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong-key"}, {"Authorization": "Basic fw-dev-key"}],
)
async def test_missing_or_unknown_key_is_refused(client: httpx.AsyncClient, headers):
    response = await client.post("/v1/chat/completions", json=CHAT, headers=headers)

    assert_openai_error(response, 401, "invalid_api_key")


async def test_keys_map_to_their_project(upstream: UpstreamStub):
    settings = make_settings(api_keys={hash_api_key("team-a-key"): "team-a"})
    app = App(settings, tables=StaticTableSource(make_table(upstream.base_url)))
    transport = httpx.ASGITransport(app=app.asgi)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
        refused = await http.post("/v1/chat/completions", json=CHAT, headers=AUTH)
        accepted = await http.post(
            "/v1/chat/completions",
            json=CHAT,
            headers={"Authorization": "Bearer team-a-key"},
        )
    await app.close()

    assert refused.status_code == 401
    assert accepted.status_code == 200
    [(_, _, event)] = queued(app)
    assert event.project_id == "team-a"


def test_plain_text_api_keys_are_refused_at_start():
    with pytest.raises(ValueError, match="SHA-256"):
        make_settings(api_keys={"fw-dev-key": "default"})


def test_tls_needs_both_the_certificate_and_its_key(tmp_path: Path):
    cert_file, key_file = self_signed(tmp_path)
    with pytest.raises(ValueError, match="TLS_KEY_FILE"):
        make_settings(tls_cert_file=cert_file)
    with pytest.raises(ValueError, match="TLS_CERT_FILE"):
        make_settings(tls_key_file=key_file)
    with pytest.raises(ValueError, match="tls_cert_file"):
        make_settings(tls_cert_file=tmp_path / "missing.pem", tls_key_file=key_file)


async def test_unknown_route_is_model_not_found(client: httpx.AsyncClient):
    response = await client.post(
        "/v1/chat/completions", json={**CHAT, "model": "nope"}, headers=AUTH
    )

    assert_openai_error(response, 404, "model_not_found")
    assert response.json()["error"]["param"] == "model"


@pytest.mark.parametrize(
    ("body", "message_part"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"model": "support-bot"}', "messages"),
        (b'{"model": "support-bot", "messages": []}', "messages"),
        (b'{"model": 3, "messages": [{"role": "user", "content": "x"}]}', "model"),
        (
            b'{"model": "support-bot", "messages": [{"role": "boss"}]}',
            "messages.0.role",
        ),
        (
            b'{"model": "support-bot", "messages": [{"role": "user", "content": "x"}],'
            b' "stream": "yes"}',
            "stream",
        ),
        (
            b'{"model": "support-bot", "messages": [{"role": "user", "content": "x"}],'
            b' "metadata": {"a": 1}}',
            "metadata",
        ),
    ],
)
async def test_malformed_requests_are_400_with_a_clear_message(
    client: httpx.AsyncClient, gateway: App, body: bytes, message_part: str
):
    response = await client.post("/v1/chat/completions", content=body, headers=AUTH)

    assert_openai_error(response, 400)
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert message_part in response.json()["error"]["message"]
    assert queued(gateway) == []


async def test_body_over_the_limit_is_413(client: httpx.AsyncClient):
    huge = {**CHAT, "messages": [{"role": "user", "content": "x" * (1024 * 1024)}]}

    response = await client.post("/v1/chat/completions", json=huge, headers=AUTH)

    assert_openai_error(response, 413)


async def test_no_routing_table_yet_is_503(upstream: UpstreamStub):
    app = App(make_settings(), tables=_EmptyTables())
    transport = httpx.ASGITransport(app=app.asgi)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
        chat = await http.post("/v1/chat/completions", json=CHAT, headers=AUTH)
        health = await http.get("/healthz")
    await app.close()

    assert_openai_error(chat, 503, "not_ready")
    assert health.status_code == 503
    assert "no routing table received yet" in health.json()["problems"]


async def test_health_says_why_it_is_unavailable(client: httpx.AsyncClient):
    response = await client.get("/healthz")

    assert response.status_code == 503
    assert response.json()["problems"] == ["the Kafka producer is not started"]


async def test_readyz_is_healthz_and_livez_ignores_kafka(client: httpx.AsyncClient):
    ready = await client.get("/readyz")
    health = await client.get("/healthz")
    live = await client.get("/livez")

    assert ready.status_code == health.status_code == 503
    assert ready.json() == health.json()
    assert ready.json()["problems"] == ["the Kafka producer is not started"]
    # Not started on Kafka is not stuck: a restart would not help.
    assert live.status_code == 200
    assert live.json() == {"status": "ok", "problems": []}


async def test_models_lists_the_routes(client: httpx.AsyncClient):
    response = await client.get("/v1/models", headers=AUTH)

    assert response.json()["object"] == "list"
    assert [m["id"] for m in response.json()["data"]] == ["dead-bot", "support-bot"]


async def test_feedback_is_validated_masked_and_pseudonymous(
    client: httpx.AsyncClient, gateway: App
):
    interaction_id = str(uuid.uuid4())
    batch = {
        "feedback": [
            {
                "interaction_id": interaction_id,
                "kind": "thumbs",
                "value": -1,
                "user": "ana",
            },
            {
                "interaction_id": interaction_id,
                "kind": "correction",
                "text": "Say: write to ana@example.org",
            },
            {"interaction_id": interaction_id, "kind": "regenerate"},
        ]
    }

    response = await client.post("/v1/feedback", json=batch, headers=AUTH)

    assert response.status_code == 202
    events = [(topic, key, e) for topic, key, e in queued(gateway)]
    assert [str(e.event_id) for _, _, e in events] == response.json()["event_ids"]
    assert all(
        topic.endswith("feedback.v1") and key == interaction_id
        for topic, key, _ in events
    )
    thumbs, correction, regenerate = (e for _, _, e in events)
    assert isinstance(thumbs, Feedback) and thumbs.kind is FeedbackKind.THUMBS
    assert thumbs.user_id == pseudonymize(b"test-pseudonym-key", "user", "ana")
    assert correction.text == "Say: write to [EMAIL]"
    assert regenerate.value == -1


@pytest.mark.parametrize(
    ("item", "message_part"),
    [
        ({"kind": "thumbs", "value": 1}, "interaction_id"),
        (
            {"interaction_id": "not-a-uuid", "kind": "thumbs", "value": 1},
            "interaction_id",
        ),
        ({"interaction_id": str(uuid.uuid4()), "kind": "love", "value": 1}, "kind"),
        (
            {"interaction_id": str(uuid.uuid4()), "kind": "thumbs", "value": 0.5},
            "thumbs",
        ),
        ({"interaction_id": str(uuid.uuid4()), "kind": "score", "value": 3}, "value"),
        ({"interaction_id": str(uuid.uuid4()), "kind": "comment"}, "text"),
        ({"interaction_id": str(uuid.uuid4()), "kind": "copy", "extra": 1}, "extra"),
    ],
)
async def test_bad_feedback_is_400_and_nothing_is_published(
    client: httpx.AsyncClient, gateway: App, item, message_part: str
):
    response = await client.post("/v1/feedback", json=item, headers=AUTH)

    assert_openai_error(response, 400)
    assert message_part in response.json()["error"]["message"]
    assert queued(gateway) == []


async def test_feedback_needs_a_key(client: httpx.AsyncClient):
    item = {"interaction_id": str(uuid.uuid4()), "kind": "copy"}

    response = await client.post("/v1/feedback", json=item)

    assert_openai_error(response, 401)


async def test_logged_interaction_is_published_masked(
    client: httpx.AsyncClient, gateway: App
):
    item = {
        "route": "my-own-app",
        "request_messages": [{"role": "user", "content": "I am bob@example.com"}],
        "response_text": "Hello bob@example.com",
        "latency_s": 0.4,
        "user": "bob",
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
    }

    response = await client.post("/v1/interactions", json=item, headers=AUTH)

    assert response.status_code == 202
    [(topic, key, event)] = queued(gateway)
    assert isinstance(event, Interaction) and topic.endswith("interactions.v1")
    assert key == response.json()["interaction_ids"][0]
    assert event.variant == "external" and event.route == "my-own-app"
    assert event.request_messages[0].content == "I am [EMAIL]"
    assert event.response_text == "Hello [EMAIL]"
    assert event.user_id == pseudonymize(b"test-pseudonym-key", "user", "bob")


async def test_logged_interaction_without_messages_is_400(client: httpx.AsyncClient):
    item = {"route": "r", "request_messages": [], "latency_s": 1}

    response = await client.post("/v1/interactions", json=item, headers=AUTH)

    assert_openai_error(response, 400)
    assert "request_messages" in response.json()["error"]["message"]


async def test_full_queue_drops_and_counts_but_still_answers(upstream: UpstreamStub):
    app = App(
        make_settings(publish_queue_size=1),
        tables=StaticTableSource(make_table(upstream.base_url)),
    )
    before = _dropped("queue_full")
    transport = httpx.ASGITransport(app=app.asgi)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
        answers = [
            await http.post("/v1/chat/completions", json=CHAT, headers=AUTH)
            for _ in range(3)
        ]
    await app.close()

    assert [a.status_code for a in answers] == [200, 200, 200]
    assert len(queued(app)) == 1
    assert _dropped("queue_full") - before == 2


async def test_metrics_are_exposed(client: httpx.AsyncClient):
    await client.post("/v1/chat/completions", json=CHAT, headers=AUTH)

    text = (await client.get("/metrics")).text

    for name in (
        "flywheel_gateway_requests_total",
        "flywheel_gateway_request_seconds",
        "flywheel_gateway_upstream_seconds",
        "flywheel_gateway_publish_queue_depth",
    ):
        assert name in text
    assert 'route="support-bot"' in text


def _dropped(reason: str) -> float:
    total = 0.0
    for metric in REGISTRY.collect():
        for sample in metric.samples:
            if (
                sample.name == "flywheel_gateway_events_dropped_total"
                and sample.labels.get("reason") == reason
            ):
                total += sample.value
    return total


class _EmptyTables:
    table = RoutingTable(version=0)
    holds_table = False

    async def run(self, stop) -> None:
        await stop.wait()


async def test_unknown_paths_and_methods_answer_in_openai_error_shape(
    client: httpx.AsyncClient,
):
    missing = await client.get("/v1/nothing-here")
    wrong_method = await client.get("/v1/chat/completions")

    assert_openai_error(missing, 404, "not_found")
    assert_openai_error(wrong_method, 405, "method_not_allowed")


async def test_an_object_level_mistake_is_named_plainly(client: httpx.AsyncClient):
    response = await client.post(
        "/v1/feedback",
        json={"interaction_id": str(uuid.uuid4()), "kind": "comment"},
        headers=AUTH,
    )

    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert not message.startswith(":") and "Value error" not in message
