"""A process that publishes events while the broker is down, so they are spooled.

Run by tests/integration/test_gateway_spool.py, which kills it with SIGKILL once it
printed the event ids it acknowledged; the spool must replay them on the next start.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from pathlib import Path

from services.common.events import Feedback, FeedbackKind
from services.common.kafka import make_producer
from services.common.settings import KafkaSettings
from services.gateway.publisher import EventPublisher
from services.gateway.spool import Spool


async def main(bootstrap: str, topic: str, spool_dir: str, count: int) -> None:
    settings = KafkaSettings(
        bootstrap_servers=bootstrap, request_timeout_s=2, producer_max_batch_bytes=1
    )
    publisher = EventPublisher(
        make_producer(settings, client_id="spool-writer"),
        queue_size=10,
        batch_size=50,
        spool=Spool(Path(spool_dir), max_bytes=1 << 26),
        fsync_interval_s=0.05,
    )
    await publisher.start(10, bootstrap_servers=bootstrap)
    print("started", flush=True)
    sys.stdin.readline()  # the test stops the broker, then says go
    loops = [
        asyncio.create_task(publisher.publish_loop()),
        asyncio.create_task(publisher.sync_loop()),
    ]
    ids = []
    for _ in range(count):
        event = Feedback(
            interaction_id=uuid.uuid4(),
            project_id="p",
            kind=FeedbackKind.THUMBS,
            value=1,
        )
        publisher.publish(topic, str(event.interaction_id), event)
        ids.append(str(event.event_id))
        await asyncio.sleep(0)
    await publisher.flush(timeout_s=30)
    await asyncio.to_thread(publisher._spool.sync)  # noqa: SLF001 - test helper
    print("spooled " + " ".join(ids), flush=True)
    await asyncio.sleep(3600)  # until killed
    for loop in loops:
        loop.cancel()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
