"""The gateway's HTTP protocol: chat completions served straight from the parser.

uvicorn's httptools protocol serves every request through ASGI: a scope, a task
running the app, message dicts each way, Starlette's request and response objects
and, for a stream, a task group listening for the disconnect. On the hot path that
was about a fifth of the gateway's CPU per request. `GatewayProtocol` is that same
protocol (a subclass: TLS, keep-alive, pipelining, graceful shutdown and the
keep-alive timeout stay uvicorn's), except that `POST /v1/chat/completions` skips
ASGI: the body is collected as the parser delivers it, one task runs
`ChatEndpoint.serve`, and the reply is written to the transport directly: a JSON
answer in one write with its head, a stream as chunked transfer encoding, one write
per piece the relay yields (each piece is what one read of the upstream brought, so
nothing waits for later data). Every other request goes through uvicorn's ASGI
cycle to the Starlette app as before.

NOTE: this relies on uvicorn's `HttpToolsProtocol` internals (its parser callbacks,
`cycle`, `pipeline`, `tasks`, `on_response_complete`); uvicorn is pinned in
pyproject.toml, and tests/gateway/test_server.py drives this class over a real
socket so that an upgrade that changes them fails there.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from services.gateway.chat import ChatEndpoint, ChatReply
from services.gateway.errors import PayloadTooLargeError

logger = logging.getLogger(__name__)

CHAT_URL = b"/v1/chat/completions"
_JSON_HEAD = b"content-type: application/json\r\ncontent-length: "
_STREAM_HEAD = (
    b"content-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\n"
)
_LAST_CHUNK = b"0\r\n\r\n"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# Chat requests parsed ahead of the one answering before reading pauses (each holds
# at most its body, up to the gateway's max_body_bytes).
PIPELINE_READ_AHEAD = 4


class _ChatExchange:
    """One chat request on a connection: its body as it arrives, then its reply.

    It stands where uvicorn keeps its request-response cycle (`protocol.cycle`), so
    the protocol's connection-lost, shutdown and pipelining code sees the
    attributes it reads there: `response_complete`, `disconnected`, `keep_alive`,
    `message_event` (the exchange itself: uvicorn calls its `set` when the
    connection is lost). It keeps no reference cycle once its task ended, so it is
    freed at once rather than by the garbage collector (whose pauses count).
    """

    __slots__ = (
        "_body",
        "_body_done",
        "_continue_expected",
        "_limit",
        "_protocol",
        "_streaming",
        "_task",
        "_too_large",
        "_waiter",
        "disconnected",
        "headers",
        "keep_alive",
        "response_complete",
    )

    def __init__(
        self,
        protocol: GatewayProtocol,
        headers: dict[str, str],
        *,
        keep_alive: bool,
        limit: int,
        continue_expected: bool,
    ) -> None:
        self._protocol = protocol
        self.headers = headers
        self.keep_alive = keep_alive
        self._limit = limit
        self._continue_expected = continue_expected
        self._body = bytearray()
        self._body_done = False
        self._too_large = False
        self._waiter: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._streaming = False
        self.disconnected = False
        self.response_complete = False
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            self._too_large = True

    @property
    def message_event(self) -> _ChatExchange:
        return self

    def set(self) -> None:
        """uvicorn's `connection_lost` calls this (as `cycle.message_event.set()`)."""
        if not self.response_complete:
            self.lost()

    # Body, from the parser's callbacks.
    def feed(self, data: bytes) -> None:
        if self._too_large or self.response_complete:
            return
        if len(self._body) + len(data) > self._limit:
            self._too_large = True
            self._body = bytearray()
            self._wake()
            return
        self._body += data

    def body_done(self) -> None:
        self._body_done = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def read_body(self) -> bytes:
        """The whole body; PayloadTooLargeError past the limit (as soon as it is)."""
        while True:
            if self._too_large:
                raise PayloadTooLargeError(
                    f"the body is larger than {self._limit} bytes"
                )
            if self._body_done:
                return bytes(self._body)
            if self.disconnected:
                # The client is gone: the request is cancelled, like a server's task.
                raise asyncio.CancelledError
            if self._continue_expected:
                self._continue_expected = False
                self._protocol.transport.write(_CONTINUE)
            self._waiter = self._protocol.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    # The request's task.
    def start(self, chat: ChatEndpoint) -> None:
        protocol = self._protocol
        protocol.running = self
        self._task = task = protocol.loop.create_task(self._run(chat))
        task.add_done_callback(protocol.tasks.discard)
        protocol.tasks.add(task)

    def lost(self) -> None:
        """The connection closed before the reply was complete."""
        self.disconnected = True
        self._wake()
        if self._task is not None:
            # Nobody is left to answer: the call is cancelled where it waits (for
            # the upstream's answer, or mid-relay) and recorded at once as such
            # (`cancelled`, or a client that left mid-stream), the upstream closed.
            self._task.cancel()

    async def _run(self, chat: ChatEndpoint) -> None:
        try:
            reply = await chat.serve(self.headers, self.read_body)
            try:
                if reply.stream is None:
                    self._write_whole(reply)
                else:
                    await self._write_stream(reply)
            finally:
                # The call is recorded once its answer is out, however sending ended.
                chat.sent(reply.interaction_id)
        finally:
            self._task = None  # the task refers to this exchange: no cycle left
            if self._protocol.running is self:
                self._protocol.running = None

    def _head(self, reply: ChatReply) -> list[bytes]:
        head = [STATUS_LINE[reply.status]]
        for raw_name, raw_value in self._protocol.server_state.default_headers:
            head += (raw_name, b": ", raw_value, b"\r\n")
        for name, value in reply.headers.items():
            head += (name.lower().encode("latin-1"), b": ", value.encode("latin-1"))
            head.append(b"\r\n")
        if not self.keep_alive:
            head.append(b"connection: close\r\n")
        return head

    def _write_whole(self, reply: ChatReply) -> None:
        if self.disconnected:
            return
        if not self._body_done:
            # Answered before the body was all read (too large, refused at the
            # door): the rest of it would be read as the next request.
            self.keep_alive = False
        head = self._head(reply)
        head += (_JSON_HEAD, b"%d\r\n\r\n" % len(reply.body), reply.body)
        self._protocol.transport.write(b"".join(head))
        self._complete()

    async def _write_stream(self, reply: ChatReply) -> None:
        stream = reply.stream
        assert stream is not None
        if self.disconnected:
            # Never relayed: `sent` records the client as gone and closes upstream.
            return
        protocol = self._protocol
        transport, flow = protocol.transport, protocol.flow
        upstream_done = reply.upstream_done or _never
        # What is ready goes out at once, unless the upstream answer is complete
        # already: then everything left comes without waiting, so it is joined
        # into fewer writes (one, for an answer that arrived whole).
        out = self._head(reply)
        out += (_STREAM_HEAD, b"\r\n")
        if not upstream_done():
            transport.write(b"".join(out))
            out = []
        self._streaming = True
        try:
            async for piece in stream:
                if flow.write_paused:
                    await flow.drain()
                if self.disconnected:
                    raise asyncio.CancelledError
                out.append(b"%x\r\n%b\r\n" % (len(piece), piece))
                if not upstream_done():
                    transport.write(b"".join(out))
                    out = []
        finally:
            self._streaming = False
            aclose: Callable[[], Any] | None = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
        out.append(_LAST_CHUNK)
        transport.write(b"".join(out))
        self._complete()

    def _complete(self) -> None:
        self.response_complete = True
        if not self.keep_alive:
            self._protocol.transport.close()
        self._protocol.on_response_complete()


def _never() -> bool:
    return False


class GatewayProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol; chat completions answered without ASGI.

    The app uvicorn loads must carry the chat endpoint as `.chat` (the gateway's
    `ChatFastPath` does); without it every request takes the ASGI path.
    """

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._chat: ChatEndpoint | None = getattr(self.app, "chat", None)
        self._body_limit: int = (
            self._chat.gatekeeper.max_body_bytes if self._chat is not None else 0
        )
        self._exchange: _ChatExchange | None = None
        # The chat exchange whose task runs (a pipelined one may be `cycle`).
        self.running: _ChatExchange | None = None

    def connection_lost(self, exc: Exception | None) -> None:
        # uvicorn marks only `cycle` (the newest request); the one answering may
        # be an earlier chat exchange, and nothing pipelined may start any more.
        waiting = [cycle for cycle, _ in self.pipeline]
        self.pipeline.clear()
        for exchange in (self.running, *waiting):
            if isinstance(exchange, _ChatExchange) and not exchange.response_complete:
                exchange.lost()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        self._exchange = None
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        parser = self.parser
        if (
            self._chat is None
            or parser.get_method() != b"POST"
            or self.url.partition(b"?")[0] != CHAT_URL
            or parser.should_upgrade()
        ):
            super().on_headers_complete()
            return
        headers: dict[str, str] = {}
        for name, value in reversed(self.headers):
            # The first of repeated headers wins, as in Starlette's `Headers.get`.
            headers[name.decode("latin-1")] = value.decode("latin-1")
        exchange = _ChatExchange(
            self,
            headers,
            keep_alive=parser.get_http_version() != "1.0"
            and parser.should_keep_alive(),
            limit=self._body_limit,
            continue_expected=self.expect_100_continue,
        )
        self._exchange = exchange
        previous = self.cycle
        self.cycle = exchange  # type: ignore[assignment]
        if previous is None or previous.response_complete:
            exchange.start(self._chat)
        else:
            # Pipelined behind a request still answering: it starts after that one.
            # Reading goes on for a few more (a client that leaves is seen at once
            # only while reading: then nothing of it runs any more).
            self.pipeline.appendleft((exchange, None))  # type: ignore[arg-type]
            if len(self.pipeline) >= PIPELINE_READ_AHEAD:
                self.flow.pause_reading()

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        if isinstance(cycle, _ChatExchange):
            # A pipelined chat call, its turn come.
            if cycle.disconnected or self.transport.is_closing():
                cycle.lost()
                return
            assert self._chat is not None
            cycle.start(self._chat)
            return
        super()._start_asgi_task(cycle, app)

    def on_body(self, body: bytes) -> None:
        exchange = self._exchange
        if exchange is None:
            super().on_body(body)
            return
        exchange.feed(body)

    def on_message_complete(self) -> None:
        exchange = self._exchange
        if exchange is None:
            super().on_message_complete()
            return
        exchange.body_done()
