"""Rate limits per key and project; no key reads or writes another project's data."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from services.gateway.app import App
from services.gateway.errors import RateLimitError
from services.gateway.limits import RateLimiter, RecentInteractions
from services.gateway.settings import RateLimit, hash_api_key
from services.gateway.tables import StaticTableSource
from tests.gateway.conftest import make_settings, make_table, queued
from tests.gateway.test_api import assert_openai_error
from tests.gateway.upstream_stub import UpstreamStub

CHAT = {"model": "support-bot", "messages": [{"role": "user", "content": "hi"}]}
KEY_A, KEY_B, KEY_A2 = "key-team-a", "key-team-b", "key-team-a-second"
KEYS = {
    hash_api_key(KEY_A): "team-a",
    hash_api_key(KEY_A2): "team-a",
    hash_api_key(KEY_B): "team-b",
}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


def test_bucket_allows_the_burst_then_refuses_until_a_token_is_back():
    clock = FakeClock()
    limiter = RateLimiter(
        make_settings(rate_limit=RateLimit(requests_per_s=2, burst=3)), clock=clock
    )

    for _ in range(3):
        limiter.check("digest", "team-a")
    with pytest.raises(RateLimitError) as refused:
        limiter.check("digest", "team-a")
    clock.now_s += 0.5
    limiter.check("digest", "team-a")

    assert refused.value.retry_after_s == pytest.approx(0.5)
    assert refused.value.headers == {"Retry-After": "1"}


def test_project_limit_is_shared_by_its_keys_and_a_refusal_costs_no_token():
    clock = FakeClock()
    settings = make_settings(
        rate_limit=RateLimit(requests_per_s=1, burst=5),
        project_rate_limits={"team-a": RateLimit(requests_per_s=1, burst=2)},
    )
    limiter = RateLimiter(settings, clock=clock)

    limiter.check("key-1", "team-a")
    limiter.check("key-2", "team-a")
    with pytest.raises(RateLimitError):
        limiter.check("key-1", "team-a")
    limiter.check("key-3", "team-b")  # another project: its own buckets
    clock.now_s += 1.0

    limiter.check("key-1", "team-a")  # the refused call took no key token


def test_recent_interactions_forget_the_oldest_past_their_size():
    recent = RecentInteractions(max_size=2)
    ids = [uuid.uuid4() for _ in range(3)]
    for interaction_id in ids:
        recent.remember(interaction_id, "team-a")

    assert len(recent) == 2
    assert recent.owner(ids[0]) is None
    assert recent.owner(ids[2]) == "team-a"


@pytest.fixture
def make_client(
    upstream: UpstreamStub,
) -> Callable[..., Any]:
    async def factory(**overrides: Any) -> tuple[App, httpx.AsyncClient]:
        app = App(
            make_settings(api_keys=KEYS, **overrides),
            tables=StaticTableSource(make_table(upstream.base_url)),
        )
        transport = httpx.ASGITransport(app=app.asgi)
        return app, httpx.AsyncClient(transport=transport, base_url="http://gw")

    return factory


async def test_past_the_key_limit_requests_get_429_with_retry_after(make_client):
    app, http = await make_client(rate_limit=RateLimit(requests_per_s=0.01, burst=2))
    async with http:
        answers = [
            await http.post("/v1/chat/completions", json=CHAT, headers=auth(KEY_A))
            for _ in range(3)
        ]
        other_key = await http.post(
            "/v1/chat/completions", json=CHAT, headers=auth(KEY_B)
        )
        feedback = await http.post(
            "/v1/feedback",
            json={"interaction_id": str(uuid.uuid4()), "kind": "thumbs", "value": 1},
            headers=auth(KEY_A),
        )
    await app.close()

    assert [answer.status_code for answer in answers[:2]] == [200, 200]
    assert_openai_error(answers[2], 429, "rate_limit_exceeded")
    assert answers[2].json()["error"]["type"] == "requests"
    assert int(answers[2].headers["retry-after"]) >= 1
    assert other_key.status_code == 200
    assert_openai_error(feedback, 429, "rate_limit_exceeded")
    # Only the answered calls were recorded.
    assert len(queued(app)) == 3


async def chat_id(http: httpx.AsyncClient, key: str) -> str:
    answer = await http.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    assert answer.status_code == 200
    return str(answer.json()["id"])


def thumbs(interaction_id: str) -> dict[str, Any]:
    return {"interaction_id": interaction_id, "kind": "thumbs", "value": 1}


def feedback_events(app: App) -> list[Any]:
    return [event for topic, _, event in queued(app) if "feedback" in topic]


async def test_feedback_on_another_projects_interaction_is_never_published(
    make_client,
):
    app, http = await make_client()  # default: unknown ids accepted
    async with http:
        theirs = await chat_id(http, KEY_A)
        unknown = str(uuid.uuid4())
        crossing = await http.post(
            "/v1/feedback", json=thumbs(theirs), headers=auth(KEY_B)
        )
        to_unknown = await http.post(
            "/v1/feedback", json=thumbs(unknown), headers=auth(KEY_B)
        )
        same_project = await http.post(
            "/v1/feedback", json=thumbs(theirs), headers=auth(KEY_A2)
        )
    await app.close()

    # The crossing is answered exactly like an unknown id, and not published.
    assert crossing.status_code == to_unknown.status_code == 202
    assert crossing.json().keys() == to_unknown.json().keys()
    assert same_project.status_code == 202
    published = {(str(e.interaction_id), e.project_id) for e in feedback_events(app)}
    assert published == {(unknown, "team-b"), (theirs, "team-a")}


async def test_refuse_mode_answers_a_crossing_as_an_unknown_id(make_client):
    app, http = await make_client(unknown_interaction_feedback="refuse")
    async with http:
        theirs = await chat_id(http, KEY_A)
        mine = await chat_id(http, KEY_B)
        unknown = str(uuid.uuid4())
        crossing = await http.post(
            "/v1/feedback", json=thumbs(theirs), headers=auth(KEY_B)
        )
        to_unknown = await http.post(
            "/v1/feedback", json=thumbs(unknown), headers=auth(KEY_B)
        )
        mixed_batch = await http.post(
            "/v1/feedback",
            json={"feedback": [thumbs(mine), thumbs(theirs)]},
            headers=auth(KEY_B),
        )
        own = await http.post("/v1/feedback", json=thumbs(mine), headers=auth(KEY_B))
    await app.close()

    assert_openai_error(crossing, 404, "interaction_not_found")
    assert_openai_error(to_unknown, 404, "interaction_not_found")
    normalized = crossing.json()["error"]["message"].replace(theirs, "<id>")
    assert normalized == to_unknown.json()["error"]["message"].replace(unknown, "<id>")
    assert_openai_error(mixed_batch, 404, "interaction_not_found")
    assert mixed_batch.json()["error"]["param"] == "feedback[1].interaction_id"
    assert own.status_code == 202
    assert [str(e.interaction_id) for e in feedback_events(app)] == [mine]


async def test_logged_interactions_belong_to_their_project(make_client):
    app, http = await make_client(unknown_interaction_feedback="refuse")
    logged = {
        "route": "support-bot",
        "request_messages": [{"role": "user", "content": "hello"}],
        "response_text": "hi",
        "latency_s": 0.2,
    }
    async with http:
        created = await http.post("/v1/interactions", json=logged, headers=auth(KEY_A))
        [theirs] = created.json()["interaction_ids"]
        taken = await http.post(
            "/v1/interactions",
            json={**logged, "interaction_id": theirs},
            headers=auth(KEY_B),
        )
        crossing = await http.post(
            "/v1/feedback", json=thumbs(theirs), headers=auth(KEY_B)
        )
        own = await http.post("/v1/feedback", json=thumbs(theirs), headers=auth(KEY_A))
    await app.close()

    assert_openai_error(taken, 409, "interaction_id_taken")
    assert_openai_error(crossing, 404, "interaction_not_found")
    assert own.status_code == 202
    projects = [event.project_id for _, _, event in queued(app)]
    assert projects == ["team-a", "team-a"]
