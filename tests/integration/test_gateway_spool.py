"""Never lose an event: broker outages and a SIGKILLed gateway, with a real broker."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaConsumer

from services.common import kafka
from services.common.embedded import EmbeddedBroker, free_port
from services.common.events import Feedback, FeedbackKind
from services.common.settings import KafkaSettings
from services.gateway.app import App
from services.gateway.publisher import EventPublisher
from services.gateway.spool import Spool
from services.gateway.tables import StaticTableSource
from tests.conftest import REPO_ROOT, wait_until
from tests.gateway.conftest import AUTH, make_settings, make_table
from tests.gateway.upstream_stub import UpstreamStub

pytestmark = pytest.mark.integration

TOPIC = "spool.feedback.v1"


@pytest.fixture
def own_broker(tmp_path):
    """A broker of this test's own, since the test stops and restarts it."""
    broker = EmbeddedBroker(tmp_path / "kafka", port=free_port())
    broker.start()
    yield broker
    broker.stop()


async def declare(broker: EmbeddedBroker) -> KafkaSettings:
    settings = KafkaSettings(
        bootstrap_servers=broker.bootstrap_servers, request_timeout_s=2, partitions=2
    )
    await kafka.wait_for_broker(settings)
    await kafka.ensure_topics(settings, [TOPIC])
    return settings


async def consume_ids(
    settings: KafkaSettings,
    expected: int,
    *,
    topic: str = TOPIC,
    field: str = "event_id",
) -> list[str]:
    """`field` of every record on `topic` until `expected` distinct values arrived,
    then one more poll, so that a repeat shows."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=settings.bootstrap_servers,
        auto_offset_reset="earliest",
        group_id=None,
    )
    await consumer.start()
    seen: list[str] = []

    async def poll(timeout_ms: int) -> None:
        batches = await consumer.getmany(timeout_ms=timeout_ms)
        for records in batches.values():
            seen.extend(orjson.loads(record.value)[field] for record in records)

    try:

        async def enough() -> bool:
            await poll(500)
            return len(set(seen)) >= expected

        await wait_until(enough, timeout_s=60)
        await poll(1000)
    finally:
        await consumer.stop()
    return seen


def feedback() -> Feedback:
    return Feedback(
        interaction_id=uuid.uuid4(), project_id="p", kind=FeedbackKind.THUMBS, value=1
    )


async def test_events_published_during_an_outage_arrive_once_it_ends(
    own_broker, tmp_path
):
    settings = await declare(own_broker)
    publisher = EventPublisher(
        kafka.make_producer(settings, client_id="t"),
        queue_size=100,
        batch_size=50,
        spool=Spool(tmp_path / "spool", max_bytes=1 << 26),
        fsync_interval_s=0.05,
    )
    await publisher.start(10, bootstrap_servers=settings.bootstrap_servers)
    loops = [
        asyncio.create_task(loop())
        for loop in (publisher.publish_loop, publisher.replay_loop, publisher.sync_loop)
    ]
    port = own_broker.port

    own_broker.stop()
    during = [feedback() for _ in range(1500)]
    for event in during:
        assert publisher.publish(TOPIC, str(event.interaction_id), event)
        await asyncio.sleep(0)
    await wait_until(lambda: publisher.spooled_count == len(during), timeout_s=60)
    # The embedded broker keeps topics in memory: declare them again before the
    # replay may reach it, or a send would create one with the default partitions.
    loops[1].cancel()
    restarted = EmbeddedBroker(own_broker.data_dir, port=port)
    restarted.start()
    try:
        await declare(restarted)
        loops.append(asyncio.create_task(publisher.replay_loop()))
        await wait_until(lambda: publisher._spool.empty, timeout_s=60)  # noqa: SLF001
        arrived = await consume_ids(settings, len(during))
    finally:
        for loop in loops:
            loop.cancel()
        await publisher.stop()
        restarted.stop()

    assert set(arrived) == {str(e.event_id) for e in during}
    assert publisher.dropped_count == 0


async def test_what_a_killed_gateway_spooled_is_replayed_on_restart(
    own_broker, tmp_path
):
    settings = await declare(own_broker)
    spool_dir = tmp_path / "spool"
    writer = subprocess.Popen(  # noqa: ASYNC220 - its pipes are read line by line
        [
            sys.executable,
            "-m",
            "tests.integration.spool_writer",
            settings.bootstrap_servers,
            TOPIC,
            str(spool_dir),
            "400",
        ],
        cwd=REPO_ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout is not None and writer.stdin is not None
        assert writer.stdout.readline().strip() == "started"
        port = own_broker.port
        own_broker.stop()
        writer.stdin.write("go\n")
        writer.stdin.flush()
        line = await asyncio.wait_for(asyncio.to_thread(writer.stdout.readline), 120)
        acknowledged = line.split()[1:]
    finally:
        writer.kill()
        writer.wait(10)
    restarted = EmbeddedBroker(own_broker.data_dir, port=port)
    restarted.start()
    try:
        await declare(restarted)
        publisher = EventPublisher(
            kafka.make_producer(settings, client_id="t2"),
            queue_size=10,
            batch_size=100,
            spool=Spool(spool_dir, max_bytes=1 << 26),
        )
        await publisher.start(10, bootstrap_servers=settings.bootstrap_servers)
        replay = asyncio.create_task(publisher.replay_loop())
        arrived = await consume_ids(settings, len(acknowledged))
        replay.cancel()
        await publisher.stop()
    finally:
        restarted.stop()

    assert len(acknowledged) == 400
    assert set(arrived) == set(acknowledged)


async def test_a_served_gateway_loses_nothing_through_a_broker_outage(
    own_broker, tmp_path
):
    """The whole gateway, over HTTP, under steady load while its broker is down for
    a while (here 8 s: the spool does not care how long, the test time does)."""
    settings = KafkaSettings(
        bootstrap_servers=own_broker.bootstrap_servers,
        request_timeout_s=2,
        partitions=2,
        topic_prefix="outage.",
    )
    topics = kafka.Topics(settings.topic_prefix)
    await kafka.ensure_topics(settings, topics.all())
    upstream = UpstreamStub()
    await upstream.start()
    app = App(
        make_settings(kafka=settings, spool_dir=tmp_path / "spool"),
        tables=StaticTableSource(make_table(upstream.base_url)),
    )
    running = asyncio.create_task(app.run())
    await asyncio.wait_for(app.listening.wait(), 30)
    answered: list[str] = []
    restarted: EmbeddedBroker | None = None

    async def load(client: httpx.AsyncClient, seconds: float) -> None:
        """About 40 requests a second, each waited for, ids kept."""
        deadline = asyncio.get_running_loop().time() + seconds
        while asyncio.get_running_loop().time() < deadline:
            response = await client.post(
                f"http://127.0.0.1:{app.port}/v1/chat/completions",
                json={
                    "model": "support-bot",
                    "messages": [{"role": "user", "content": "hello"}],
                },
                headers=AUTH,
            )
            assert response.status_code == 200, response.text
            answered.append(response.headers["x-flywheel-interaction-id"])
            await asyncio.sleep(0.025)

    try:
        async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
            await load(client, 2)
            port = own_broker.port
            own_broker.stop()
            before = len(answered)
            await load(client, 8)
            during = len(answered) - before
            restarted = EmbeddedBroker(own_broker.data_dir, port=port)
            restarted.start()
            # The embedded broker keeps topics in memory: declare them again.
            await kafka.ensure_topics(settings, topics.all())
            await load(client, 2)
        await wait_until(
            lambda: app.publisher.published_count >= len(answered), timeout_s=90
        )
        arrived = await consume_ids(
            settings,
            len(set(answered[before:])),
            topic=topics.interactions,
            field="interaction_id",
        )
    finally:
        app.stop()
        await asyncio.wait_for(running, 30)
        await upstream.stop()
        if restarted is not None:
            restarted.stop()

    assert during > 20 and app.publisher.spooled_count >= during
    assert app.publisher.dropped_count == 0
    # Every call answered from the outage on arrived (the embedded broker keeps
    # records in memory only, so what it had acknowledged before it was stopped is
    # gone with it); a send cut off by the outage may have been written twice (the
    # collector keeps one per event_id), none is lost.
    assert set(arrived) == set(answered[before:])
    print(
        f"answered {len(answered)} ({during} during the outage), spooled "
        f"{app.publisher.spooled_count}, "
        f"arrived {len(arrived)} ({len(arrived) - len(set(arrived))} repeated)"
    )
