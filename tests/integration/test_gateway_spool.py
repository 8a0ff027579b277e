"""Never lose an event: broker outages and a SIGKILLed gateway, with a real broker."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid

import orjson
import pytest
from aiokafka import AIOKafkaConsumer

from services.common import kafka
from services.common.embedded import EmbeddedBroker, free_port
from services.common.events import Feedback, FeedbackKind
from services.common.settings import KafkaSettings
from services.gateway.publisher import EventPublisher
from services.gateway.spool import Spool
from tests.conftest import REPO_ROOT, wait_until

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


async def consume_ids(settings: KafkaSettings, expected: int) -> list[str]:
    consumer = AIOKafkaConsumer(
        TOPIC,
        bootstrap_servers=settings.bootstrap_servers,
        auto_offset_reset="earliest",
        group_id=None,
    )
    await consumer.start()
    seen: list[str] = []
    try:

        async def enough() -> bool:
            batches = await consumer.getmany(timeout_ms=500)
            seen.extend(
                orjson.loads(r.value)["event_id"]
                for records in batches.values()
                for r in records
            )
            return len(set(seen)) >= expected

        await wait_until(enough, timeout_s=60)
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
