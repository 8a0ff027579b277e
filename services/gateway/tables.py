"""Where the routing table comes from: the trainer's control plane, a file or a test."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Protocol

import orjson

from services.common.routing import RoutingTable
from services.common.routing_client import RoutingTableWatcher
from services.common.settings import ControlPlaneSettings


class TableSource(Protocol):
    """Holds the current routing table and keeps it up to date while running."""

    @property
    def table(self) -> RoutingTable: ...

    @property
    def holds_table(self) -> bool: ...

    async def run(self, stop: asyncio.Event) -> None: ...


class StaticTableSource:
    """A fixed table, from a JSON file or given directly (tests)."""

    def __init__(self, table: RoutingTable) -> None:
        self._table = table

    @classmethod
    def from_file(cls, path: Path) -> StaticTableSource:
        """Load a table in RoutingTable.to_json's shape; ValueError when it is not."""
        try:
            body = orjson.loads(path.read_bytes())
            return cls(RoutingTable.from_json(body))
        except (OSError, orjson.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(
                f"routing_table_file {path} is not a readable routing table: {error!r}"
            ) from error

    @property
    def table(self) -> RoutingTable:
        return self._table

    def replace(self, table: RoutingTable) -> None:
        """Swap the table in (what a watcher does on a new version)."""
        self._table = table

    @property
    def holds_table(self) -> bool:
        return True

    async def run(self, stop: asyncio.Event) -> None:
        await stop.wait()


class WatchedTableSource:
    """Follows the trainer's routing table over gRPC, keeping the last one."""

    def __init__(self, settings: ControlPlaneSettings) -> None:
        self._watcher = RoutingTableWatcher(settings)

    @property
    def table(self) -> RoutingTable:
        return self._watcher.table

    @property
    def holds_table(self) -> bool:
        return self._watcher.table.version > 0

    async def run(self, stop: asyncio.Event) -> None:
        await self._watcher.watch_loop(stop)
