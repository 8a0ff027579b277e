"""A durable local spool for events the broker cannot take right now.

Records are appended to numbered segment files (`seg-000001.log`, ...), each record a
header (payload length, CRC-32 of the payload) and the payload (topic, key and value
separated by newlines: topics and keys never hold one, and the value is JSON, whose
strings escape them). A `position` file says how far replay got; it is replaced
atomically after the broker acknowledged what was read, so a crash replays the last
batch again (the collector drops the repeats by event id) and never skips one.

A record torn by a crash mid-write fails its length or CRC check: recovery cuts the
last segment back to its last whole record.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

logger = logging.getLogger(__name__)

HEADER = struct.Struct(">II")
SEGMENT_GLOB = "seg-*.log"


@dataclass(frozen=True)
class SpooledEvent:
    """One event as it will be sent: topic, key and the encoded value."""

    topic: str
    key: bytes
    value: bytes

    def encode(self) -> bytes:
        payload = b"\n".join((self.topic.encode(), self.key, self.value))
        return HEADER.pack(len(payload), zlib.crc32(payload)) + payload

    @classmethod
    def decode(cls, payload: bytes) -> SpooledEvent:
        topic, key, value = payload.split(b"\n", 2)
        return cls(topic.decode(), key, value)


@dataclass(frozen=True)
class Cursor:
    """A place in the spool: a segment number and a byte offset in it."""

    segment: int
    offset: int


def _segment_name(number: int) -> str:
    return f"seg-{number:06d}.log"


def _read_records(data: bytes) -> tuple[list[tuple[int, bytes]], int]:
    """Whole records in `data` as (end offset, payload), and where valid data ends."""
    records: list[tuple[int, bytes]] = []
    offset = 0
    while offset + HEADER.size <= len(data):
        length, crc = HEADER.unpack_from(data, offset)
        end = offset + HEADER.size + length
        payload = data[offset + HEADER.size : end]
        if end > len(data) or zlib.crc32(payload) != crc:
            break
        records.append((end, payload))
        offset = end
    return records, offset


class Spool:
    """Append-only segments plus a replay position, capped at `max_bytes`."""

    def __init__(self, folder: Path, *, max_bytes: int, segment_bytes: int = 8 << 20):
        self._folder = folder
        self._max_bytes = max_bytes
        self._segment_bytes = segment_bytes
        folder.mkdir(parents=True, exist_ok=True)
        self._position = self._load_position()
        self._segments = sorted(
            int(path.stem.removeprefix("seg-")) for path in folder.glob(SEGMENT_GLOB)
        )
        self._recover_tail()
        self._drop_consumed_segments()
        self._writer = self._open_writer()
        self._dirty = False
        self.size_bytes = self._measure()
        if self.size_bytes:
            logger.warning(
                "spool holds events from before the restart bytes=%d folder=%s",
                self.size_bytes,
                folder,
            )

    # -- state on disk ----------------------------------------------------------

    def _path(self, number: int) -> Path:
        return self._folder / _segment_name(number)

    def _load_position(self) -> Cursor:
        try:
            body = json.loads((self._folder / "position").read_text())
            return Cursor(int(body["segment"]), int(body["offset"]))
        except FileNotFoundError:
            return Cursor(1, 0)

    def _recover_tail(self) -> None:
        if not self._segments:
            return
        last = self._path(self._segments[-1])
        data = last.read_bytes()
        _, valid_end = _read_records(data)
        if valid_end < len(data):
            logger.warning(
                "spool segment had a torn record, cut back segment=%s bytes_lost=%d",
                last.name,
                len(data) - valid_end,
            )
            with last.open("r+b") as handle:
                handle.truncate(valid_end)
                os.fsync(handle.fileno())

    def _drop_consumed_segments(self) -> None:
        for number in [n for n in self._segments if n < self._position.segment]:
            self._path(number).unlink(missing_ok=True)
            self._segments.remove(number)

    def _open_writer(self) -> BinaryIO:
        if not self._segments:
            self._segments.append(max(1, self._position.segment))
        return self._path(self._segments[-1]).open("ab")

    def _measure(self) -> int:
        total = sum(self._path(n).stat().st_size for n in self._segments)
        if self._segments and self._segments[0] == self._position.segment:
            total -= self._position.offset
        return max(0, total)

    # -- writing ------------------------------------------------------------------

    @property
    def empty(self) -> bool:
        return self.size_bytes == 0

    def append(self, events: list[SpooledEvent]) -> int:
        """Append what fits under the cap; the number appended (the rest is refused)."""
        appended = 0
        for event in events:
            record = event.encode()
            if self.size_bytes + len(record) > self._max_bytes:
                break
            if self._writer.tell() >= self._segment_bytes:
                self._roll()
            self._writer.write(record)
            self.size_bytes += len(record)
            appended += 1
        # Flushed to the OS at once (readers see it); fsync'd in batches by `sync`.
        self._writer.flush()
        self._dirty = self._dirty or appended > 0
        return appended

    def _roll(self) -> None:
        self._writer.flush()
        os.fsync(self._writer.fileno())
        self._writer.close()
        self._segments.append(self._segments[-1] + 1)
        self._writer = self._path(self._segments[-1]).open("ab")

    def sync(self) -> None:
        """fsync what was appended since the last call (blocking: run in a thread)."""
        if self._dirty:
            self._dirty = False
            os.fsync(self._writer.fileno())

    def close(self) -> None:
        self._dirty = True
        self.sync()
        self._writer.close()

    # -- replaying ------------------------------------------------------------------

    def read(self, max_events: int) -> tuple[list[SpooledEvent], Cursor]:
        """Up to `max_events` from the replay position, and the cursor past them."""
        events: list[SpooledEvent] = []
        cursor = self._position
        for number in [n for n in self._segments if n >= cursor.segment]:
            offset = cursor.offset if number == cursor.segment else 0
            with self._path(number).open("rb") as handle:
                handle.seek(offset)
                data = handle.read()
            records, _ = _read_records(data)
            for end, payload in records[: max_events - len(events)]:
                events.append(SpooledEvent.decode(payload))
                cursor = Cursor(number, offset + end)
            if len(events) >= max_events:
                break
            is_last = number == self._segments[-1]
            if not is_last:
                cursor = Cursor(number + 1, 0)
        return events, cursor

    def commit(self, cursor: Cursor) -> None:
        """Record that everything before `cursor` reached the broker."""
        temporary = self._folder / "position.tmp"
        with temporary.open("w") as handle:
            json.dump({"segment": cursor.segment, "offset": cursor.offset}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        temporary.replace(self._folder / "position")
        self._position = cursor
        self._drop_consumed_segments()
        if not self._segments:
            self._writer.close()
            self._writer = self._open_writer()
        self.size_bytes = self._measure()
