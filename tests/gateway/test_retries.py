"""Upstream retries with backoff and fallback to the route's other variants."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from services.common.events import Interaction
from services.common.routing import bucket_of
from services.gateway.app import App
from services.gateway.handlers import FALLBACK_FROM_KEY
from services.gateway.metrics import REGISTRY
from services.gateway.tables import StaticTableSource
from tests.gateway.conftest import AUTH, make_settings, make_table, queued
from tests.gateway.upstream_stub import UpstreamStub


def interactions(app: App) -> list[Interaction]:
    return [event for _, _, event in queued(app) if isinstance(event, Interaction)]


def user_on(variant: str, upstream: UpstreamStub) -> str:
    """A user id that `support-bot` assigns to `variant`."""
    route = make_table(upstream.base_url).routes["support-bot"]
    return next(
        user
        for user in (f"user-{n}" for n in range(1000))
        if route.assign(bucket_of("support-bot", user)).name == variant
    )


def sent(upstream: UpstreamStub, prompt: str) -> list[str]:
    """The upstream models the stub was asked for with this prompt, in order."""
    return [
        request["body"]["model"]
        for request in upstream.requests
        if request["body"]["messages"][-1]["content"] == prompt
    ]


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
async def make_client(
    upstream: UpstreamStub,
) -> AsyncIterator[Any]:
    apps: list[App] = []

    async def make(**overrides: Any) -> tuple[App, httpx.AsyncClient]:
        settings = make_settings(upstream_retry_backoff_s=0.001, **overrides)
        app = App(settings, tables=StaticTableSource(make_table(upstream.base_url)))
        apps.append(app)
        transport = httpx.ASGITransport(app=app.asgi)
        return app, httpx.AsyncClient(transport=transport, base_url="http://gateway")

    yield make
    for app in apps:
        await app.close()


async def chat(
    client: httpx.AsyncClient, prompt: str, user: str, **extra: Any
) -> httpx.Response:
    body = {
        "model": "support-bot",
        "messages": [{"role": "user", "content": prompt}],
        "user": user,
        **extra,
    }
    return await client.post("/v1/chat/completions", json=body, headers=AUTH)


@pytest.mark.parametrize("stream", [False, True])
async def test_a_retriable_failure_is_sent_again_and_answered(
    make_client: Any, upstream: UpstreamStub, stream: bool
):
    app, client = await make_client()
    prompt = f"flaky:{uuid.uuid4().hex}:2:503"
    user = user_on("bot-v1", upstream)
    retries = counter(
        "flywheel_gateway_upstream_retries_total",
        route="support-bot",
        variant="bot-v1",
    )

    response = await chat(client, prompt, user, stream=stream)

    assert response.status_code == 200
    assert sent(upstream, prompt) == ["smol", "smol", "smol"]
    [event] = interactions(app)
    assert event.error is None and event.variant == "bot-v1"
    assert event.arm == "control" and FALLBACK_FROM_KEY not in event.metadata
    assert (
        counter(
            "flywheel_gateway_upstream_retries_total",
            route="support-bot",
            variant="bot-v1",
        )
        == retries + 2
    )


async def test_retries_stop_at_the_configured_count(
    make_client: Any, upstream: UpstreamStub
):
    app, client = await make_client(upstream_retries=1, upstream_fallback=False)
    prompt = f"flaky:{uuid.uuid4().hex}:5:502"

    response = await chat(client, prompt, user_on("bot-v1", upstream))

    assert response.status_code == 502
    assert response.json()["error"]["code"] == "stub_failure"
    assert sent(upstream, prompt) == ["smol", "smol"]
    [event] = interactions(app)
    assert event.error is not None and event.error.status_code == 502


@pytest.mark.parametrize("status", [400, 401, 404, 422])
async def test_a_refused_request_is_neither_retried_nor_handed_over(
    make_client: Any, upstream: UpstreamStub, status: int
):
    app, client = await make_client()
    prompt = f"flaky:{uuid.uuid4().hex}:9:{status}"

    response = await chat(client, prompt, user_on("bot-v2", upstream))

    assert response.status_code == status
    assert sent(upstream, prompt) == ["lora-v2"]
    [event] = interactions(app)
    assert event.variant == "bot-v2" and event.error is not None


async def test_a_timeout_is_not_retried_but_handed_to_the_fallback(
    make_client: Any, upstream: UpstreamStub
):
    app, client = await make_client(upstream_timeout_s=0.3)
    user = user_on("bot-v2", upstream)

    response = await chat(client, "hang", user)

    # Both variants hang: one try each, then the timeout reaches the client.
    assert response.status_code == 504
    failed, answered = interactions(app)
    assert (failed.variant, answered.variant) == ("bot-v2", "bot-v1")
    assert failed.error is not None and failed.error.type == "upstream_timeout"


@pytest.mark.parametrize("stream", [False, True])
async def test_a_failing_variant_hands_the_call_to_the_other_one(
    make_client: Any, upstream: UpstreamStub, stream: bool
):
    app, client = await make_client()
    prompt = "fail-model:lora-v2:503"
    user = user_on("bot-v2", upstream)
    before = len(sent(upstream, prompt))
    fallbacks = counter(
        "flywheel_gateway_upstream_fallbacks_total",
        route="support-bot",
        variant="bot-v2",
        fallback="bot-v1",
    )

    response = await chat(client, prompt, user, stream=stream)

    assert response.status_code == 200
    # Three tries on the routed variant, then the other one answers.
    assert sent(upstream, prompt)[before:] == ["lora-v2"] * 3 + ["smol"]
    failed, served = interactions(app)
    # The routed variant's failure counts against it, in its experiment arm...
    assert (failed.variant, failed.arm, failed.experiment_id) == (
        "bot-v2",
        "treatment",
        "exp-1",
    )
    assert failed.error is not None and failed.error.status_code == 503
    # ...and the answer the user saw belongs to no arm: its feedback must not
    # credit either arm with the other's answers.
    assert served.variant == "bot-v1" and served.error is None
    assert served.arm is None and served.experiment_id is None
    assert served.metadata[FALLBACK_FROM_KEY] == "bot-v2"
    assert str(served.interaction_id) == response.headers["x-flywheel-interaction-id"]
    assert failed.interaction_id != served.interaction_id
    assert (
        counter(
            "flywheel_gateway_upstream_fallbacks_total",
            route="support-bot",
            variant="bot-v2",
            fallback="bot-v1",
        )
        == fallbacks + 1
    )


async def test_without_fallback_the_routed_variants_error_is_the_answer(
    make_client: Any, upstream: UpstreamStub
):
    app, client = await make_client(upstream_fallback=False, upstream_retries=0)

    response = await chat(client, "fail-model:lora-v2:503", user_on("bot-v2", upstream))

    assert response.status_code == 503
    [event] = interactions(app)
    assert event.variant == "bot-v2" and event.arm == "treatment"


async def test_an_answer_cut_off_mid_body_is_not_sent_again(
    make_client: Any, upstream: UpstreamStub
):
    app, client = await make_client(upstream_fallback=False)
    prompt = f"cut-body:{uuid.uuid4().hex}"

    response = await chat(client, prompt, user_on("bot-v1", upstream))

    # The upstream did the work (and may bill it): one try only.
    assert response.status_code == 502
    assert sent(upstream, prompt) == ["smol"]
    [event] = interactions(app)
    assert event.error is not None and event.error.type == "upstream_unreachable"


async def test_an_answer_cut_off_mid_body_may_still_fall_back(
    make_client: Any, upstream: UpstreamStub
):
    app, client = await make_client()
    prompt = f"cut-body:{uuid.uuid4().hex}"

    response = await chat(client, prompt, user_on("bot-v1", upstream), stream=False)

    # Both variants break off the same way here: one try each, no retries.
    assert response.status_code == 502
    assert sent(upstream, prompt) == ["smol", "lora-v2"]
    assert len(interactions(app)) == 2


async def test_an_answer_larger_than_the_limit_is_a_bad_upstream_response(
    make_client: Any, upstream: UpstreamStub
):
    app, client = await make_client(
        upstream_max_response_bytes=2048, upstream_fallback=False
    )

    response = await chat(client, "long:5000", user_on("bot-v1", upstream))

    assert response.status_code == 502
    assert "upstream_max_response_bytes" in response.json()["error"]["message"]
    [event] = interactions(app)
    assert event.error is not None and event.error.type == "bad_upstream_response"
