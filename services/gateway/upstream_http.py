"""A small HTTP/1.1 client for the upstream call: pooled connections, httptools.

The gateway sends one kind of request upstream (a POST with a JSON body) and reads
one kind of answer (JSON, or server-sent events). aiohttp did this for about a
tenth of the gateway's CPU per request, most of it generic machinery (request and
response objects, multidict headers, payload registry, per-read timeout objects).
This client keeps what the gateway uses: keep-alive connections pooled per host
(LIFO, at most `max_connections` open), TLS for https, a connect timeout and a
timeout on every wait for the upstream, chunked and Content-Length bodies (parsed by
httptools, in C), gzip or deflate bodies decoded, a cap on a body read whole, and
reading paused while a streamed body waits for its reader.

NOTE: no proxies (like the aiohttp session before it, with `trust_env` off), no
redirects (an upstream answering 3xx is an error for the gateway), no Expect:
100-continue, no HTTP/2. A POST is never sent again by this module: a connection
the upstream closed while idle fails the call as unreachable, and the gateway's
retry policy decides.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

import httptools

# A streamed body buffered past this stops reading from the upstream until taken.
_HIGH_WATER = 1 << 16


class UpstreamHttpError(Exception):
    """Base of this module's errors."""


class ConnectError(UpstreamHttpError):
    """The connection could not be made (refused, DNS, TLS, connect timeout)."""


class DisconnectedError(UpstreamHttpError):
    """The connection ended before the response's head arrived."""


class BodyBrokenError(UpstreamHttpError):
    """The connection ended, or the body was malformed, before the body's end."""


class ReadTimeoutError(UpstreamHttpError, TimeoutError):
    """The upstream sent nothing for `read_timeout_s`."""


class MalformedResponseError(UpstreamHttpError):
    """The bytes before the body are not an HTTP/1.x response."""


class TooLargeError(UpstreamHttpError):
    """A body read whole grew past its limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the body is larger than {limit} bytes")
        self.limit = limit


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a URL's requests go, and the fixed start of their request head."""

    host: str
    port: int
    tls: bool
    head: bytes  # request line and Host header

    @classmethod
    def of(cls, url: str) -> Endpoint:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        tls = parts.scheme == "https"
        port = parts.port or (443 if tls else 80)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host = parts.hostname
        authority = f"[{host}]" if ":" in host else host
        if parts.port is not None:
            authority += f":{port}"
        head = f"POST {target} HTTP/1.1\r\nhost: {authority}\r\n".encode("latin-1")
        return cls(host, port, tls, head)


class _Connection(asyncio.Protocol):
    """One connection; at most one request on it at a time."""

    __slots__ = ("closed", "idle_since", "key", "response", "transport")

    def __init__(self, key: tuple[str, int, bool]) -> None:
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.response: UpstreamResponse | None = None
        self.closed = False
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but are ones.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:
            # Nothing was asked: an idle connection must not talk. Drop it.
            self.close()
            return
        response.feed(data)

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        response = self.response
        if response is not None:
            response.lost(exc)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class UpstreamResponse:
    """A response as it arrives: its status and headers, then its body."""

    __slots__ = (
        "_chunks",
        "_client",
        "_conn",
        "_decoder",
        "_done",
        "_error",
        "_head_done",
        "_header_items",
        "_keep_alive",
        "_limit",
        "_loop",
        "_parser",
        "_paused",
        "_read_timeout_s",
        "_released",
        "_size",
        "_waiter",
        "headers",
        "status",
    )

    def __init__(self, client: HttpClient, conn: _Connection) -> None:
        self._client = client
        self._conn = conn
        self._loop = client.loop
        self._read_timeout_s = client.read_timeout_s
        # The parser refers to this response: dropped once done, so that no cycle
        # is left for the garbage collector.
        self._parser: httptools.HttpResponseParser | None = (
            httptools.HttpResponseParser(self)
        )
        self._header_items: list[tuple[bytes, bytes]] = []
        self._chunks: list[bytes] = []
        self._size = 0
        self._limit = 0  # 0: no cap on what is buffered
        self._decoder: Any = None
        self._head_done = False
        self._keep_alive = False
        self._done = False
        self._error: UpstreamHttpError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._released = False
        self.status = 0
        self.headers: dict[str, str] = {}

    # Parser callbacks.
    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_items.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None
        status = parser.get_status_code()
        if 100 <= status < 200:
            # An interim answer (100 Continue, 103 Early Hints): the real one follows.
            self._header_items = []
            return
        self.status = status
        # Read here: the parser forgets it once the message is complete.
        self._keep_alive = parser.should_keep_alive()
        headers = {}
        for name, value in self._header_items:
            headers[name.decode("latin-1").lower()] = value.decode("latin-1").strip()
        self.headers = headers
        encoding = headers.get("content-encoding", "identity").lower()
        if encoding in ("gzip", "x-gzip"):
            self._decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            self._decoder = zlib.decompressobj()
        self._head_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self._decoder is not None:
            try:
                body = self._decoder.decompress(body)
            except zlib.error as error:
                self._fail(BodyBrokenError(f"undecodable body: {error}"))
                return
        self._chunks.append(body)
        self._size += len(body)
        if self._limit and self._size > self._limit:
            self._fail(TooLargeError(self._limit))
            return
        if not self._limit and self._size > _HIGH_WATER and not self._paused:
            transport = self._conn.transport
            if transport is not None:
                self._paused = True
                transport.pause_reading()
        if self._waiter is not None:
            self._wake()

    def on_message_complete(self) -> None:
        if not self._head_done:
            return  # the end of an interim answer
        if self._decoder is not None:
            rest = self._decoder.flush()
            if rest:
                self._chunks.append(rest)
                self._size += len(rest)
        self._done = True
        self._wake()

    # From the connection.
    def feed(self, data: bytes) -> None:
        parser = self._parser
        if self._error is not None or parser is None:
            return
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(MalformedResponseError("the upstream switched protocols"))
        except httptools.HttpParserError as error:
            if self._head_done:
                self._fail(BodyBrokenError(f"malformed body: {error}"))
            else:
                self._fail(MalformedResponseError(f"malformed response: {error}"))

    def lost(self, exc: Exception | None) -> None:
        if self._done or self._error is not None:
            return
        if not self._head_done:
            self._fail(DisconnectedError(_why("before its answer", exc)))
            return
        headers = self.headers
        if "content-length" not in headers and "chunked" not in headers.get(
            "transfer-encoding", ""
        ):
            # A body delimited by the connection's end: this is its end.
            self.on_message_complete()
            return
        self._fail(BodyBrokenError(_why("mid-body", exc)))

    def _fail(self, error: UpstreamHttpError) -> None:
        if self._error is None:
            self._error = error
        self._conn.close()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        """Until the connection brings something (or `read_timeout_s` passed)."""
        waiter = self._waiter = self._loop.create_future()
        timer = self._loop.call_later(self._read_timeout_s, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    # For the caller.
    async def head(self) -> None:
        """Wait for the status and headers."""
        while not self._head_done:
            if self._error is not None:
                raise self._error
            await self._wait()

    async def read(self, limit: int) -> bytes:
        """The whole body (TooLargeError past `limit` bytes); then `release`."""
        self._limit = limit
        if self._size > limit:
            self._fail(TooLargeError(limit))
        self._resume()
        while not self._done:
            if self._error is not None:
                raise self._error
            await self._wait()
        if self._error is not None:
            raise self._error
        body = b"".join(self._chunks)
        self._chunks = []
        self.release()
        return body

    async def iter_any(self) -> AsyncIterator[bytes]:
        """The body as it arrives: everything buffered at each step, joined."""
        while True:
            if self._chunks:
                data = b"".join(self._chunks)
                self._chunks = []
                self._size = 0
                self._resume()
                yield data
                continue
            if self._error is not None:
                raise self._error
            if self._done:
                return
            await self._wait()

    def _resume(self) -> None:
        if self._paused:
            self._paused = False
            transport = self._conn.transport
            if transport is not None and not self._conn.closed:
                transport.resume_reading()

    def finished(self) -> bool:
        """Whether the upstream is done: the body is all here, or it failed."""
        return self._done or self._error is not None

    def at_eof(self) -> bool:
        return self._done and not self._chunks

    def release(self) -> None:
        """Give the connection back for the next request (closed if it cannot be)."""
        if self._released:
            return
        self._released = True
        conn = self._conn
        reusable = (
            self._done and self._error is None and not conn.closed and self._keep_alive
        )
        conn.response = None
        self._parser = None
        self._client.give_back(conn, reusable=reusable)

    def close(self) -> None:
        """Close the connection (an answer not read to its end)."""
        if self._released:
            return
        self._released = True
        conn = self._conn
        conn.response = None
        self._parser = None
        conn.close()
        self._client.give_back(conn, reusable=False)


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(ReadTimeoutError("no data from the upstream in time"))


def _why(where: str, exc: Exception | None) -> str:
    if exc is None:
        return f"the upstream closed the connection {where}"
    return f"the connection broke {where}: {type(exc).__name__}: {exc}"


class HttpClient:
    """Pooled HTTP/1.1 connections to the upstreams; opened on the first call."""

    def __init__(
        self,
        *,
        connect_timeout_s: float,
        read_timeout_s: float,
        max_connections: int,
        keepalive_s: float = 30.0,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        """`tls_context`: for https upstreams; default: the system's CAs, verified."""
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self._max_connections = max_connections
        self._keepalive_s = keepalive_s
        self._idle: dict[tuple[str, int, bool], list[_Connection]] = {}
        self._open = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._tls = tls_context
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop

    async def post(
        self, endpoint: Endpoint, head: bytes, body: bytes
    ) -> UpstreamResponse:
        """Send a POST (`head`: its header lines after Host); its status and headers.

        `head` ends with a blank line's worth of header lines (no final CRLF) and
        carries no Content-Length: this adds it.
        """
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        conn = await self._acquire(endpoint)
        response = UpstreamResponse(self, conn)
        conn.response = response
        assert conn.transport is not None
        conn.transport.write(
            b"%b%bcontent-length: %d\r\n\r\n%b" % (endpoint.head, head, len(body), body)
        )
        try:
            await response.head()
        except BaseException:
            response.close()
            raise
        return response

    async def _acquire(self, endpoint: Endpoint) -> _Connection:
        key = (endpoint.host, endpoint.port, endpoint.tls)
        while True:
            idle = self._idle.get(key)
            now = time.monotonic()
            while idle:
                conn = idle.pop()
                if not conn.closed and now - conn.idle_since < self._keepalive_s:
                    return conn
                self._discard(conn)
            if self._open < self._max_connections:
                break
            waiter = self.loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # the slot it was given goes to the next
                elif waiter in self._waiters:
                    self._waiters.remove(waiter)
                raise
        self._open += 1
        conn = _Connection(key)
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                await self.loop.create_connection(
                    lambda: conn,
                    endpoint.host,
                    endpoint.port,
                    ssl=self._tls_context() if endpoint.tls else None,
                    server_hostname=endpoint.host if endpoint.tls else None,
                )
        except BaseException as error:
            self._open -= 1
            self._wake_one()
            conn.close()
            if isinstance(error, (OSError, TimeoutError, ssl.SSLError)):
                raise ConnectError(
                    f"cannot connect to {endpoint.host}:{endpoint.port}: "
                    f"{type(error).__name__}: {error}"
                ) from error
            raise
        return conn

    def give_back(self, conn: _Connection, *, reusable: bool) -> None:
        if reusable and not conn.closed:
            conn.idle_since = time.monotonic()
            self._idle.setdefault(conn.key, []).append(conn)
            self._wake_one()
            return
        conn.close()
        self._discard(conn)

    def _discard(self, conn: _Connection) -> None:
        conn.close()
        self._open -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls

    async def close(self) -> None:
        """Close every idle connection; idempotent."""
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
                self._open -= 1
        self._idle.clear()
