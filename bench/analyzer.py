"""Analyzer speed: events per second, and feedback-to-metric latency at a fixed rate.

`python -m bench.analyzer [--events N] [--rate R] [--seconds S]` starts its own
embedded broker and the real analyzer (`python -m services.analyzer`, the embedded
stack's settings: one record per produced batch; `--batch-bytes` changes that), then
measures:

- throughput: N interactions produced at once; from the first send until
  `flywheel_analyzer_requests_total` (summed) shows all of them;
- latency: feedback on those interactions published at R events/s for S seconds;
  for each one, the time from its publish until `flywheel_analyzer_feedback_total`
  (scraped from /metrics every `--poll-s`, default 50 ms) counts it: p50 and p99.

Both counts (the analyzer's metric and the baseline's) are read every `--poll-s`, so
both latencies carry the same sampling error, at most that interval. (Scraping in a
tight loop measures the scrapes more than the analyzer: each one renders and gzips
the whole exposition on the analyzer's own cores. Prometheus scrapes every 15 s.)

The baseline, on the same broker in the same run: a plain aiokafka consumer reading
the same topics (throughput, and publish-to-consume latency at the same rate). The
goal from the issue: p99 under one second at 1,000 events/s on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer
from prometheus_client.parser import text_string_to_metric_families

from services.common import kafka
from services.common.embedded import EmbeddedBroker, free_port, stop_process
from services.common.events import (
    ChatMessage,
    Feedback,
    FeedbackKind,
    Interaction,
    Usage,
    encode,
    utc_now,
)
from services.common.settings import KafkaSettings

REPO_ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 300.0


def make_interactions(count: int) -> list[Interaction]:
    now = utc_now()
    return [
        Interaction(
            project_id="bench",
            user_id=f"user-{n % 500}",
            route="support-bot",
            variant="v1",
            request_messages=[ChatMessage(role="user", content="hi")],
            response_text="hello",
            usage=Usage(prompt_tokens=7, completion_tokens=3, total_tokens=10),
            latency_s=0.3,
            started_at=now,
            finished_at=now,
        )
        for n in range(count)
    ]


def thumbs_up(interaction: Interaction) -> Feedback:
    return Feedback(
        interaction_id=interaction.interaction_id,
        project_id="bench",
        kind=FeedbackKind.THUMBS,
        value=1.0,
    )


async def scrape_sum(client: httpx.AsyncClient, url: str, name: str) -> float:
    try:
        text = (await client.get(url)).text
    except httpx.HTTPError:
        return -1.0
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    )


def start_analyzer(
    settings: KafkaSettings,
    data_dir: Path,
    port: int,
    batch_bytes: int,
    *,
    app_id: str,
    replica: int,
) -> Any:
    """One analyzer replica; replicas of one `app_id` share the partitions."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    env.update(
        {
            "FLYWHEEL_KAFKA__BOOTSTRAP_SERVERS": settings.bootstrap_servers,
            "FLYWHEEL_KAFKA__TOPIC_PREFIX": settings.topic_prefix,
            "FLYWHEEL_CONTROL__ADDRESS": f"127.0.0.1:{free_port()}",
            "FLYWHEEL_ANALYZER_METRICS_PORT": str(port),
            "FLYWHEEL_ANALYZER_APP_ID": app_id,
            "FLYWHEEL_ANALYZER_DATA_DIR": str(data_dir / f"faust-{replica}"),
            "FLYWHEEL_ANALYZER_PRODUCER_MAX_BATCH_BYTES": str(batch_bytes),
            "FLYWHEEL_ANALYZER_LOGGING__LEVEL": "WARNING",
        }
    )
    log = (data_dir / f"analyzer-{replica}.log").open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "services.analyzer"],
        cwd=REPO_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


async def wait_for(condition: Callable[[], Awaitable[bool]], poll_s: float) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not await condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not done in {TIMEOUT_S} s")
        await asyncio.sleep(poll_s)


async def publish_paced(
    producer: Any, topic: str, events: list[Feedback], rate: float
) -> list[float]:
    """Send `events` at `rate` per second; returns each one's send time."""
    sent_at = []
    start = time.monotonic()
    for index, event in enumerate(events):
        delay = start + index / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        sent_at.append(time.monotonic())
        await producer.send(
            topic, encode(event), key=str(event.interaction_id).encode()
        )
    await producer.flush()
    return sent_at


def latencies(sent_at: list[float], seen: list[tuple[float, float]]) -> list[float]:
    """Per event k: first time the count reached k+1, minus its send time."""
    times = [t for t, _ in seen]
    counts = [c for _, c in seen]
    result = []
    for index, sent in enumerate(sent_at):
        position = bisect.bisect_left(counts, index + 1)
        if position < len(times):
            result.append(max(times[position] - sent, 0.0))
    return result


async def watch(
    read_count: Callable[[], Awaitable[float]], target: float, poll_s: float
) -> list[tuple[float, float]]:
    """(time, count) each time the count changes, until it reaches `target`."""
    seen: list[tuple[float, float]] = []
    last = -1.0

    async def done() -> bool:
        nonlocal last
        count = await read_count()
        if count != last:
            seen.append((time.monotonic(), count))
            last = count
        return count >= target

    await wait_for(done, poll_s)
    return seen


class CountingConsumer:
    """The baseline: a plain consumer counting what it reads from one topic."""

    def __init__(self, settings: KafkaSettings, topic: str, wait_ms: int) -> None:
        # The analyzer's fetch wait too (consumer_fetch_max_wait_ms), so that
        # both hold an idle fetch equally long.
        self.consumer = AIOKafkaConsumer(
            topic,
            **settings.client_options(),
            group_id=f"bench-{uuid.uuid4().hex[:8]}",
            client_id="bench-baseline",
            auto_offset_reset="earliest",
            fetch_max_wait_ms=wait_ms,
        )
        self.count = 0
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.consumer.start()
        self.task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            batches = await self.consumer.getmany(timeout_ms=50)
            self.count += sum(len(batch) for batch in batches.values())

    async def read_count(self) -> float:
        await asyncio.sleep(0.001)
        return float(self.count)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        await self.consumer.stop()


async def measure(args: argparse.Namespace, data_dir: Path) -> list[tuple[str, ...]]:
    broker = EmbeddedBroker(data_dir / "kafka", port=free_port())
    await asyncio.to_thread(broker.start)
    settings = KafkaSettings(bootstrap_servers=broker.bootstrap_servers)
    topics = kafka.Topics(settings.topic_prefix)
    await kafka.wait_for_broker(settings)
    await kafka.ensure_topics(settings, topics.all())
    app_id = f"analyzer-bench-{uuid.uuid4().hex[:6]}"
    ports = [free_port() for _ in range(args.replicas)]
    analyzers = [
        start_analyzer(
            settings, data_dir, port, args.batch_bytes, app_id=app_id, replica=n
        )
        for n, port in enumerate(ports)
    ]
    producer = kafka.make_producer(settings, client_id="bench")
    await producer.start()
    try:
        async with httpx.AsyncClient(timeout=10) as client:

            async def metric(name: str) -> float:
                """The metric summed over the replicas (each counts its partitions)."""
                if any(analyzer.poll() is not None for analyzer in analyzers):
                    raise RuntimeError(f"an analyzer exited; see {data_dir}/*.log")
                values = await asyncio.gather(
                    *(
                        scrape_sum(client, f"http://127.0.0.1:{port}/metrics", name)
                        for port in ports
                    )
                )
                return -1.0 if min(values) < 0 else sum(values)

            async def ready() -> bool:
                """Every replica ready: the group has settled, partitions shared."""
                answers = await asyncio.gather(
                    *(_ready(client, port) for port in ports)
                )
                return all(answers)

            await wait_for(ready, args.poll_s)
            return await run_phases(args, settings, topics, producer, metric)
    finally:
        await producer.stop()
        for analyzer in analyzers:
            stop_process(analyzer, grace_s=15.0)
        broker.stop()


async def _ready(client: httpx.AsyncClient, port: int) -> bool:
    try:
        response = await client.get(f"http://127.0.0.1:{port}/readyz")
    except httpx.HTTPError:
        return False
    return response.status_code == 200


async def run_phases(
    args: argparse.Namespace,
    settings: KafkaSettings,
    topics: kafka.Topics,
    producer: Any,
    metric: Callable[[str], Awaitable[float]],
) -> list[tuple[str, ...]]:
    interactions = make_interactions(args.events)
    wait_ms = settings.consumer_fetch_max_wait_ms
    baseline = CountingConsumer(settings, topics.interactions, wait_ms)
    await baseline.start()
    started = time.monotonic()
    for event in interactions:
        await producer.send(
            topics.interactions, encode(event), key=str(event.interaction_id).encode()
        )
    await producer.flush()

    async def analyzer_requests() -> float:
        return await metric("flywheel_analyzer_requests_total")

    analyzer_seen, baseline_seen = await asyncio.gather(
        watch(analyzer_requests, args.events, args.poll_s),
        watch(baseline.read_count, args.events, args.poll_s),
    )
    await baseline.stop()
    analyzer_eps = args.events / (analyzer_seen[-1][0] - started)
    baseline_eps = args.events / (baseline_seen[-1][0] - started)

    feedback = [thumbs_up(i) for i in interactions[: int(args.rate * args.seconds)]]
    baseline = CountingConsumer(settings, topics.feedback, wait_ms)
    await baseline.start()

    async def analyzer_feedback() -> float:
        return await metric("flywheel_analyzer_feedback_total")

    sent_at, analyzer_seen, baseline_seen = await asyncio.gather(
        publish_paced(producer, topics.feedback, feedback, args.rate),
        watch(analyzer_feedback, len(feedback), args.poll_s),
        watch(baseline.read_count, len(feedback), args.poll_s),
    )
    await baseline.stop()
    return table(
        (analyzer_eps, baseline_eps),
        latencies(sent_at, analyzer_seen),
        latencies(sent_at, baseline_seen),
    )


def quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def table(
    throughput: tuple[float, float], analyzer: list[float], baseline: list[float]
) -> list[tuple[str, ...]]:
    rows = [("measure", "analyzer", "baseline consumer", "ratio")]
    rows.append(
        (
            "events/s (interactions)",
            f"{throughput[0]:,.0f}",
            f"{throughput[1]:,.0f}",
            f"{throughput[0] / throughput[1]:.2f}",
        )
    )
    for q in (0.5, 0.99):
        a, b = quantile(analyzer, q), quantile(baseline, q)
        rows.append(
            (
                f"feedback -> metric p{round(q * 100)} (s)",
                f"{a:.3f}",
                f"{b:.3f}",
                f"{a / b:.1f}" if b > 0 else "-",
            )
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=5.0)
    # 1 is what the embedded stack uses (Tansu 0.6.0 changelog workaround); a real
    # Kafka cluster runs with the default 16384.
    parser.add_argument("--batch-bytes", type=int, default=1)
    parser.add_argument("--poll-s", type=float, default=0.05)
    # Replicas of the analyzer in one consumer group (the way it scales out).
    parser.add_argument("--replicas", type=int, default=1)
    args = parser.parse_args()
    if args.rate * args.seconds > args.events:
        parser.error("--rate x --seconds must not exceed --events")
    with tempfile.TemporaryDirectory(prefix="bench-analyzer-") as folder:
        rows = asyncio.run(measure(args, Path(folder)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))
    print(
        f"latency at {args.rate:,.0f} feedback events/s for {args.seconds:g} s, "
        f"{args.replicas} analyzer replica(s), producer batch {args.batch_bytes} "
        "bytes, counts read every "
        f"{args.poll_s * 1000:.0f} ms; goal: p99 under 1 s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
