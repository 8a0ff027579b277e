"""The gateway served for real: the official OpenAI client in, events on Kafka out."""

from __future__ import annotations

import asyncio
import ssl
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from openai import AsyncOpenAI

from services.common.kafka import Topics, make_consumer
from services.common.routing import bucket_of
from services.common.settings import KafkaSettings
from services.gateway.app import App
from services.gateway.handlers import pseudonymize
from services.gateway.tables import StaticTableSource
from tests.certificates import self_signed
from tests.conftest import wait_until
from tests.gateway.conftest import DEV_KEY, make_settings, make_table
from tests.gateway.upstream_stub import UpstreamStub

pytestmark = pytest.mark.integration

PROMPT = "My email is ana@example.org and my card 4111 1111 1111 1111"
PSEUDONYM_KEY = b"test-pseudonym-key"


@pytest.fixture(scope="module")
async def upstream() -> AsyncIterator[UpstreamStub]:
    stub = UpstreamStub()
    await stub.start()
    yield stub
    await stub.stop()


@pytest.fixture
async def served(
    upstream: UpstreamStub, kafka_settings: KafkaSettings
) -> AsyncIterator[App]:
    app = App(
        make_settings(kafka=kafka_settings),
        tables=StaticTableSource(make_table(upstream.base_url)),
    )
    running = asyncio.create_task(app.run())
    await asyncio.wait_for(app.listening.wait(), 30)
    yield app
    app.stop()
    await asyncio.wait_for(running, 30)


async def consume_all(
    settings: KafkaSettings, *topics: str, expected: int
) -> list[Any]:
    """Read `topics` from the start until `expected` records arrived (or time out)."""
    consumer = make_consumer(
        settings, *topics, group_id=f"test-{uuid.uuid4().hex[:8]}", client_id="test"
    )
    await consumer.start()
    records: list[Any] = []
    try:

        async def enough() -> bool:
            batches = await consumer.getmany(timeout_ms=500)
            for batch in batches.values():
                records.extend(batch)
            return len(records) >= expected

        await wait_until(enough, timeout_s=30)
        # One more poll, to catch an unexpected duplicate.
        for batch in (await consumer.getmany(timeout_ms=1000)).values():
            records.extend(batch)
    finally:
        await consumer.stop()
    return records


async def test_openai_client_round_trip_publishes_masked_events(
    served: App, kafka_settings: KafkaSettings
):
    base_url = f"http://127.0.0.1:{served.port}/v1"
    client = AsyncOpenAI(
        api_key=DEV_KEY,
        base_url=base_url,
        max_retries=0,
        http_client=httpx.AsyncClient(trust_env=False),
    )
    topics = Topics(kafka_settings.topic_prefix)

    # Non-streaming, with the raw response to see the header.
    raw = await client.chat.completions.with_raw_response.create(
        model="support-bot",
        messages=[{"role": "user", "content": PROMPT}],
        user="ana",
    )
    completion = raw.parse()
    # Streaming with usage.
    stream = await client.chat.completions.create(
        model="support-bot",
        messages=[{"role": "user", "content": "stream please"}],
        user="ana",
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    streamed_text = "".join(
        c.choices[0].delta.content or "" for c in chunks if c.choices
    )
    feedback = await client.post(
        "/feedback",
        body={
            "interaction_id": completion.id,
            "kind": "comment",
            "user": "ana",
            "text": "wrong, mail me at ana@example.org",
        },
        cast_to=httpx.Response,
    )
    await client.close()

    assert completion.choices[0].message.content == f"You said: {PROMPT}"
    assert raw.headers["x-flywheel-interaction-id"] == completion.id
    assert streamed_text == "You said: stream please"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
    assert feedback.status_code == 202

    records = await consume_all(
        kafka_settings, topics.interactions, topics.feedback, expected=3
    )
    interactions = [r for r in records if r.topic == topics.interactions]
    feedbacks = [r for r in records if r.topic == topics.feedback]
    assert len(interactions) == 2 and len(feedbacks) == 1
    by_id = {r.key.decode(): orjson.loads(r.value) for r in interactions}
    assert completion.id in by_id and chunks[0].id in by_id
    first, streamed = by_id[completion.id], by_id[chunks[0].id]
    expected_variant = (
        make_table("x").routes["support-bot"].assign(bucket_of("support-bot", "ana"))
    )
    for event in (first, streamed):
        assert event["variant"] == expected_variant.name
        assert event["user_id"] == pseudonymize(PSEUDONYM_KEY, "user", "ana")
        assert "ana@example.org" not in orjson.dumps(event).decode()
    assert first["request_messages"][0]["content"] == (
        "My email is [EMAIL] and my card [CARD]"
    )
    assert first["stream"] is False and streamed["stream"] is True
    assert streamed["response_text"] == "You said: stream please"
    assert streamed["usage"]["completion_tokens"] == 4
    [comment] = [orjson.loads(r.value) for r in feedbacks]
    assert feedbacks[0].key.decode() == completion.id
    assert comment["text"] == "wrong, mail me at [EMAIL]"
    assert comment["user_id"] == first["user_id"]


async def test_health_is_ok_once_serving(served: App):
    base = f"http://127.0.0.1:{served.port}"
    async with httpx.AsyncClient(trust_env=False) as http:
        response = await http.get(f"{base}/healthz")
        ready = await http.get(f"{base}/readyz")
        live = await http.get(f"{base}/livez")

    assert response.status_code == 200, response.text
    assert response.json()["routing_version"] == 3
    assert ready.status_code == 200 and ready.json()["problems"] == []
    assert live.status_code == 200 and live.json()["status"] == "ok"


async def test_tls_serves_chat_completions_streams_and_other_paths(
    upstream: UpstreamStub, kafka_settings: KafkaSettings, tmp_path: Path
):
    cert_file, key_file = self_signed(tmp_path)
    app = App(
        make_settings(
            kafka=kafka_settings, tls_cert_file=cert_file, tls_key_file=key_file
        ),
        tables=StaticTableSource(make_table(upstream.base_url)),
    )
    running = asyncio.create_task(app.run())
    await asyncio.wait_for(app.listening.wait(), 30)
    try:
        trusting = ssl.create_default_context(cafile=str(cert_file))
        async with httpx.AsyncClient(verify=trusting, trust_env=False) as http:
            client = AsyncOpenAI(
                base_url=f"https://127.0.0.1:{app.port}/v1",
                api_key=DEV_KEY,
                http_client=http,
            )
            completion = await client.chat.completions.create(
                model="support-bot", messages=[{"role": "user", "content": "hi"}]
            )
            stream = await client.chat.completions.create(
                model="support-bot",
                messages=[{"role": "user", "content": "hi"}],
                stream=True,
            )
            chunks = [chunk async for chunk in stream]
            models = await client.models.list()
        # Plain HTTP to the TLS port gets no answer; a client that does not trust
        # the certificate refuses it.
        async with httpx.AsyncClient(trust_env=False) as plain:
            with pytest.raises(httpx.HTTPError):
                await plain.get(f"http://127.0.0.1:{app.port}/healthz")
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await plain.get(f"https://127.0.0.1:{app.port}/healthz")
    finally:
        app.stop()
        await asyncio.wait_for(running, 30)

    assert completion.choices[0].message.content
    assert chunks and chunks[0].id == chunks[-1].id
    assert "support-bot" in [model.id for model in models.data]
