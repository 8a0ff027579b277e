"""faust's Kafka transport with a configurable fetch wait.

faust-streaming 0.15.3 creates its aiokafka consumer with `fetch_max_wait_ms=1500`
and no setting to change it. A broker may hold a fetch that long before answering
even when records arrive meanwhile (the embedded Tansu broker does), and every
feedback event then waits up to 1.5 s before the analyzer sees it: at 300 events/s
the median feedback-to-metric time was 0.43 s with it and 0.07 s with 100 ms (see
`python -m bench.analyzer`). `fetch_max_wait_ms` only bounds how long an idle fetch
is held open, so a shorter one costs an empty fetch round trip per interval when
there is no traffic, nothing more.

The classes below change only that one value on the consumer faust creates, before
it starts (aiokafka reads it when the consumer starts its fetcher), to the shared
`KafkaSettings.consumer_fetch_max_wait_ms` every other consumer uses too.
"""

from __future__ import annotations

from typing import Any

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TransportT


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # The attribute aiokafka's AIOKafkaConsumer.__init__ stores the argument in.
        app = self.app
        assert isinstance(app, App)  # noqa: S101 - only App creates this transport
        consumer._fetch_max_wait_ms = app.fetch_max_wait_ms  # noqa: SLF001
        return consumer


class _Consumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> _ConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class _Transport(faust_aiokafka.Transport):
    Consumer = _Consumer


class App(faust.App):
    """A faust App whose consumers hold an idle fetch at most `fetch_max_wait_ms`."""

    def __init__(self, *args: Any, fetch_max_wait_ms: int, **kwargs: Any) -> None:
        self.fetch_max_wait_ms = fetch_max_wait_ms
        super().__init__(*args, **kwargs)

    def _new_transport(self) -> TransportT:
        return _Transport(self.conf.broker_consumer, self)
