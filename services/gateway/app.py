"""The gateway process: wires the clients and owns the lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
from collections.abc import Iterator
from pathlib import Path

import uvicorn
from aiokafka import AIOKafkaProducer
from starlette.types import ASGIApp

from services.common import lifecycle
from services.common.kafka import make_producer
from services.gateway.api import GatewayApi
from services.gateway.proxy import UpstreamClient
from services.gateway.publisher import EventPublisher
from services.gateway.server import GatewayProtocol
from services.gateway.settings import DEV_PSEUDONYM_KEY, GatewaySettings
from services.gateway.spool import Spool
from services.gateway.tables import StaticTableSource, TableSource, WatchedTableSource

logger = logging.getLogger(__name__)

# How long the requests the server cancelled at shutdown get to record themselves.
SETTLE_TIMEOUT_S = 2.0


def _path_or_none(path: Path | None) -> str | None:
    return None if path is None else str(path)


class _Server(uvicorn.Server):
    """uvicorn, leaving the signals to the App's stop event."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def default_table_source(settings: GatewaySettings) -> TableSource:
    """The file given by `routing_table_file`, else the trainer's control plane."""
    if settings.routing_table_file is not None:
        return StaticTableSource.from_file(settings.routing_table_file)
    return WatchedTableSource(settings.control)


class App:
    """The gateway: HTTP server, routing table source and event publisher.

    The routing table source and the Kafka producer can be injected (tests);
    otherwise they come from the settings.
    """

    def __init__(
        self,
        settings: GatewaySettings,
        *,
        tables: TableSource | None = None,
        producer: AIOKafkaProducer | None = None,
    ) -> None:
        self.settings = settings
        self.tables = tables or default_table_source(settings)
        self._upstream = UpstreamClient(
            api_keys=settings.upstream_api_keys,
            timeout_s=settings.upstream_timeout_s,
            connect_timeout_s=settings.upstream_connect_timeout_s,
            max_connections=settings.upstream_max_connections,
            max_response_bytes=settings.upstream_max_response_bytes,
        )
        spool = (
            Spool(settings.spool_dir, max_bytes=settings.spool_max_bytes)
            if settings.spool_dir is not None
            else None
        )
        self.publisher = EventPublisher(
            producer or make_producer(settings.kafka, client_id="flywheel-gateway"),
            queue_size=settings.publish_queue_size,
            batch_size=settings.publish_batch_size,
            spool=spool,
            fsync_interval_s=settings.spool_fsync_interval_s,
        )
        self.api = GatewayApi(
            settings,
            tables=self.tables,
            upstream=self._upstream,
            publisher=self.publisher,
        )
        self.asgi: ASGIApp = self.api.application()
        self.port: int | None = None
        self.listening = asyncio.Event()
        self._stop = asyncio.Event()

    def stop(self) -> None:
        """Ask `run` to shut down; idempotent."""
        self._stop.set()

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Serve until `stop` is set (or `stop()` is called), then shut down."""
        if stop is not None:
            self._stop = stop
        self._log_start()

        try:
            # Start the dependencies: the broker connection, then the listening socket.
            await self.publisher.start(
                self.settings.startup_timeout_s,
                bootstrap_servers=self.settings.kafka.bootstrap_servers,
            )
            sock = self._bind()
            # A full collection would otherwise scan start-up's objects: a p99 spike.
            lifecycle.settle_heap()
            async with asyncio.TaskGroup() as tasks:
                background = [tasks.create_task(self.publisher.publish_loop())]
                if self.settings.spool_dir is not None:
                    background.append(tasks.create_task(self.publisher.replay_loop()))
                    background.append(tasks.create_task(self.publisher.sync_loop()))
                tasks.create_task(self.tables.run(self._stop))
                try:
                    # Serve until asked to stop; uvicorn lets in-flight requests end.
                    await self._serve(sock)
                finally:
                    # Record the calls the server cut off, flush what the last
                    # requests published, then end the siblings.
                    self._stop.set()
                    cut = await self.api.chat.settle(SETTLE_TIMEOUT_S)
                    if cut:
                        logger.warning("calls cut off by the shutdown count=%d", cut)
                    await self.publisher.flush(self.settings.flush_timeout_s)
                    for task in background:
                        task.cancel()
        finally:
            # Close the clients, even after a failure.
            await self.close()
            logger.info(
                "gateway stopped events_published=%d events_dropped=%d",
                self.publisher.published_count,
                self.publisher.dropped_count,
            )

    async def close(self) -> None:
        """Close the producer and the upstream client; idempotent."""
        await self.publisher.stop()
        await self._upstream.close()

    def _bind(self) -> socket.socket:
        host, port = self.settings.host, self.settings.port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as error:
            sock.close()
            raise OSError(
                f"cannot listen on {host}:{port} ({error.strerror}); change "
                "FLYWHEEL_GATEWAY_HOST / FLYWHEEL_GATEWAY_PORT"
            ) from error
        sock.listen(2048)
        sock.setblocking(False)
        self.port = int(sock.getsockname()[1])
        self.listening.set()
        tls = self.settings.tls_cert_file is not None
        logger.info("gateway listening host=%s port=%d tls=%s", host, self.port, tls)
        return sock

    async def _serve(self, sock: socket.socket) -> None:
        config = uvicorn.Config(
            self.asgi,
            lifespan="off",
            log_config=None,
            access_log=False,
            # Client addresses are not used: no X-Forwarded-For parsing per request.
            proxy_headers=False,
            # uvicorn's httptools protocol with chat completions served without
            # ASGI (services/gateway/server.py).
            http=GatewayProtocol,
            # Whole seconds (uvicorn's type): rounded up, never to no grace at all.
            timeout_graceful_shutdown=math.ceil(self.settings.graceful_shutdown_s),
            # TLS when configured (both files or neither: the settings check it).
            ssl_certfile=_path_or_none(self.settings.tls_cert_file),
            ssl_keyfile=_path_or_none(self.settings.tls_key_file),
        )
        server = _Server(config)
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        stopping = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            # Calls the graceful shutdown cuts are the gateway's doing, not a client's.
            self.api.chat.stopping = True
            server.should_exit = True
            await serving
            sock.close()

    def _log_start(self) -> None:
        settings = self.settings
        logger.info(
            "gateway starting host=%s port=%d kafka=%s topic_prefix=%s routing=%s "
            "projects=%d upstream_timeout_s=%.0f queue=%d",
            settings.host,
            settings.port,
            settings.kafka.bootstrap_servers,
            settings.kafka.topic_prefix,
            settings.routing_table_file or settings.control.address,
            len(set(settings.api_keys.values())),
            settings.upstream_timeout_s,
            settings.publish_queue_size,
        )
        if settings.pseudonym_key.get_secret_value() == DEV_PSEUDONYM_KEY:
            logger.warning(
                "pseudonym_key is the development default: anyone with this code "
                "can reverse user pseudonyms; set FLYWHEEL_GATEWAY_PSEUDONYM_KEY"
            )
