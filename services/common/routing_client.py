"""Follows the trainer's routing table over gRPC, keeping the last one."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from grpc import aio

from services.common.control import auth_metadata, open_channel
from services.common.lifecycle import sleep_or_stop
from services.common.pb.flywheel.v1 import control_pb2 as pb
from services.common.pb.flywheel.v1 import control_pb2_grpc as pb_grpc
from services.common.routing import RoutingTable
from services.common.settings import ControlPlaneSettings

logger = logging.getLogger(__name__)


class RoutingTableWatcher:
    """Holds the newest routing table and keeps it current from a server stream.

    When the controller is down the watcher keeps serving the last table it had and
    reconnects with jittered exponential backoff (capped by the settings).
    """

    def __init__(
        self,
        settings: ControlPlaneSettings,
        *,
        on_update: Callable[[RoutingTable], None] | None = None,
    ) -> None:
        self._settings = settings
        self._on_update = on_update
        self._table = RoutingTable(version=0)
        self._first_table = asyncio.Event()
        self.connected = False

    @property
    def table(self) -> RoutingTable:
        return self._table

    async def wait_ready(self, timeout_s: float) -> RoutingTable:
        """Wait until a first table arrived; raise TimeoutError otherwise."""
        async with asyncio.timeout(timeout_s):
            await self._first_table.wait()
        return self._table

    def _apply(self, message: pb.RoutingTable) -> None:
        if message.version <= self._table.version:
            return
        self._table = RoutingTable.from_proto(message)
        self._first_table.set()
        logger.info(
            "routing table applied version=%d routes=%s",
            self._table.version,
            sorted(self._table.routes),
        )
        if self._on_update is not None:
            self._on_update(self._table)

    async def watch_loop(self, stop: asyncio.Event) -> None:
        """Follow the table until `stop` is set."""
        backoff_s = 0.2
        while not stop.is_set():
            channel = open_channel(self._settings)
            try:
                stub = pb_grpc.RoutingServiceStub(channel)
                call = stub.WatchRoutingTable(
                    pb.WatchRoutingTableRequest(known_version=self._table.version),
                    metadata=auth_metadata(self._settings),
                )
                stop_wait = asyncio.ensure_future(stop.wait())
                try:
                    async for message in _until(call, stop_wait):
                        self.connected = True
                        backoff_s = 0.2
                        self._apply(message)
                finally:
                    stop_wait.cancel()
                    call.cancel()
            except aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.UNAUTHENTICATED:
                    logger.error("control plane refused our token; check control.token")
                else:
                    logger.warning(
                        "routing watch interrupted code=%s, keeping version=%d",
                        error.code().name,
                        self._table.version,
                    )
            finally:
                self.connected = False
                await channel.close()
            if stop.is_set():
                break
            delay_s = min(backoff_s, self._settings.reconnect_max_backoff_s)
            backoff_s *= 2
            jitter = random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not a secret
            await sleep_or_stop(stop, delay_s * jitter)


async def _until(
    call: aio.UnaryStreamCall, stop_wait: asyncio.Future[Any]
) -> AsyncIterator[Any]:
    """Yield the stream's messages until it ends or `stop_wait` completes."""
    iterator = call.__aiter__()
    while True:
        next_message = asyncio.ensure_future(iterator.__anext__())
        done, _ = await asyncio.wait(
            {next_message, stop_wait}, return_when=asyncio.FIRST_COMPLETED
        )
        if next_message not in done:
            next_message.cancel()
            return
        try:
            yield next_message.result()
        except StopAsyncIteration:
            return
