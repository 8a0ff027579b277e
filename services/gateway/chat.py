"""The `/v1/chat/completions` endpoint: route, forward, relay, record."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

import orjson
from prometheus_client import Counter, Histogram
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from services.common.events import MAX_TEXT_CHARS, ErrorInfo, utc_now
from services.common.routing import Route, Variant, bucket_of
from services.gateway.errors import (
    AuthenticationError,
    BadUpstreamResponseError,
    GatewayError,
    ModelNotFoundError,
    NotReadyError,
    PayloadTooLargeError,
    UpstreamBrokeOffError,
    UpstreamError,
    UpstreamTimeoutError,
    UpstreamUnreachableError,
)
from services.gateway.handlers import (
    MAX_METADATA_CHARS,
    CallRecord,
    ChatRequest,
    Identity,
    Outcome,
    build_interaction,
    identify,
    parse_chat_request,
    upstream_body,
)
from services.gateway.limits import RateLimiter, RecentInteractions
from services.gateway.metrics import (
    EVENTS_DROPPED,
    REQUEST_SECONDS,
    REQUESTS,
    UPSTREAM_FALLBACKS,
    UPSTREAM_RETRIES,
    UPSTREAM_SECONDS,
)
from services.gateway.proxy import UpstreamClient, relay_stream
from services.gateway.publisher import EventPublisher
from services.gateway.settings import GatewaySettings, hash_api_key
from services.gateway.tables import TableSource
from services.gateway.upstream_http import UpstreamResponse

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
_Send = Callable[[Variant, bytes], Awaitable[_T]]

# Upstream statuses that say the call was not done and may work if sent again.
RETRIABLE_STATUSES = frozenset({429, 500, 502, 503, 504})


def _may_retry(error: GatewayError) -> bool:
    """Whether sending the same call to the same variant again may work.

    Not when the answer broke off after it began: the upstream did the work.
    """
    if isinstance(error, UpstreamBrokeOffError):
        return False
    if isinstance(error, UpstreamUnreachableError):
        return True
    return isinstance(error, UpstreamError) and error.status_code in RETRIABLE_STATUSES


def _may_fall_back(error: GatewayError) -> bool:
    """Whether the variant itself failed (not the request): another may answer."""
    return _may_retry(error) or isinstance(
        error, UpstreamTimeoutError | UpstreamBrokeOffError | BadUpstreamResponseError
    )


INTERACTION_ID_HEADER = "X-Flywheel-Interaction-Id"

# Metric children by metric and label values: `labels()` takes a lock and builds
# its key on every call. Label values come from the routing table and HTTP
# statuses, so this stays small.
_CHILDREN: dict[tuple[object, ...], Any] = {}


def _child(metric: Counter | Histogram, *values: str) -> Any:
    key = (metric, *values)
    child = _CHILDREN.get(key)
    if child is None:
        child = _CHILDREN[key] = metric.labels(*values)
    return child


def json_response(body: Any, status_code: int = 200, **kwargs: Any) -> Response:
    """A JSON response serialized with orjson."""
    return Response(
        orjson.dumps(body), status_code, media_type="application/json", **kwargs
    )


def error_response(
    error: GatewayError, headers: dict[str, str] | None = None
) -> Response:
    """An error in OpenAI's shape, with the error's status and headers."""
    if error.headers:
        headers = {**(headers or {}), **error.headers}
    return json_response(error.to_body(), error.status_code, headers=headers)


def error_body(error: GatewayError) -> bytes:
    """An error's JSON body in OpenAI's shape."""
    return orjson.dumps(error.to_body())


@dataclass(slots=True)
class ChatReply:
    """A chat completion's answer, before any server writes it out.

    JSON (`body`) or server-sent events (`stream`); `headers` are the extra ones
    (the interaction id, an error's). The ASGI app sends it as a Starlette response
    (`to_response`), the gateway's own HTTP protocol writes it to the socket itself
    (`services.gateway.server`). Either then calls `ChatEndpoint.sent`.
    `upstream_done` tells a stream's writer whether the upstream answer is complete
    (the rest of the stream then comes without waiting for the upstream).
    """

    status: int
    headers: dict[str, str]
    body: bytes = b""
    stream: AsyncIterator[bytes] | None = None
    interaction_id: str | None = None
    upstream_done: Callable[[], bool] | None = None

    def to_response(self) -> Response:
        if self.stream is not None:
            return StreamingResponse(
                self.stream,
                status_code=self.status,
                media_type="text/event-stream",
                headers=self.headers,
            )
        return Response(
            self.body, self.status, media_type="application/json", headers=self.headers
        )


def error_reply(
    error: GatewayError,
    headers: dict[str, str] | None = None,
    interaction_id: str | None = None,
) -> ChatReply:
    """An error in OpenAI's shape as a reply, with the error's status and headers."""
    merged = {**(headers or {}), **error.headers} if error.headers else headers or {}
    return ChatReply(
        error.status_code, merged, error_body(error), interaction_id=interaction_id
    )


@dataclass
class _Call:
    """A routed chat call in flight, with what recording it needs."""

    chat: ChatRequest
    project_id: str
    route: Route
    variant: Variant
    bucket: int
    identity: Identity
    started_s: float
    started_at: datetime
    interaction_id: uuid.UUID = field(default_factory=uuid.uuid4)
    outcome: Outcome = field(default_factory=Outcome)
    status_code: int = 200
    finished: bool = False
    # The routed variant's name once a fallback variant took the call over.
    fallback_from: str | None = None
    # A stream's upstream answer, closed by the relay (or by `sent` if never relayed).
    upstream_response: UpstreamResponse | None = None
    # Whether a stream's relay began (so its end is recorded by `sent`).
    relayed: bool = False
    # The interaction id as text, made once.
    key: str = field(init=False)

    def __post_init__(self) -> None:
        self.key = str(self.interaction_id)

    def fail(self, error: GatewayError) -> None:
        self.outcome.error = ErrorInfo(
            # An upstream's code and message are its own: cut to the event's limits.
            type=(error.code or error.error_type)[:MAX_METADATA_CHARS],
            message=error.message[:MAX_TEXT_CHARS],
            status_code=error.status_code,
        )


class Gatekeeper:
    """Authentication, body limits and route lookup shared by every endpoint."""

    def __init__(self, settings: GatewaySettings, tables: TableSource) -> None:
        self._api_keys = settings.api_keys
        self.max_body_bytes = settings.max_body_bytes
        self._limiter = RateLimiter(settings)
        self.tables = tables
        self.recent = RecentInteractions(settings.recent_interactions_max)

    def authenticate(self, request: Request) -> str:
        """The project id of the request's API key, within its rate limits.

        AuthenticationError for a missing or unknown key, RateLimitError past a limit.
        """
        return self.authenticate_headers(request.headers)

    def authenticate_headers(self, headers: Mapping[str, str]) -> str:
        """`authenticate` for a request's headers (lowercase names)."""
        scheme, _, key = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise AuthenticationError(
                "missing API key: send the header 'Authorization: Bearer <key>'"
            )
        digest = hash_api_key(key.strip())
        project_id = self._api_keys.get(digest)
        if project_id is None:
            raise AuthenticationError("incorrect API key provided")
        if self._limiter.enabled:
            self._limiter.check(digest, project_id)
        return project_id

    async def read_body(self, request: Request) -> bytes:
        """The whole body, or PayloadTooLargeError past `max_body_bytes`."""
        limit = self.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise PayloadTooLargeError(f"the body is larger than {limit} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLargeError(f"the body is larger than {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def find_route(self, name: str) -> Route:
        """The route named `name`; ModelNotFoundError or NotReadyError otherwise."""
        if not self.tables.holds_table:
            raise NotReadyError("the gateway holds no routing table yet; retry shortly")
        route = self.tables.table.routes.get(name)
        if route is None:
            raise ModelNotFoundError(
                f"the model {name!r} does not exist: it names no route", param="model"
            )
        return route


class ChatEndpoint:
    """Forwards chat completions to the routed variant and records each one."""

    def __init__(
        self,
        settings: GatewaySettings,
        *,
        gatekeeper: Gatekeeper,
        upstream: UpstreamClient,
        publisher: EventPublisher,
        interactions_topic: str,
    ) -> None:
        self._settings = settings
        self.gatekeeper = gatekeeper
        self._upstream = upstream
        self._publisher = publisher
        self._topic = interactions_topic
        self._pseudonym_key = settings.pseudonym_key.get_secret_value().encode()
        # Calls routed and not yet recorded, so that a shutdown records them all.
        self._open: dict[str, _Call] = {}
        self._none_open = asyncio.Event()
        self._none_open.set()
        # Set when the server stops taking requests: a stream cut from then on is
        # recorded as cut by the gateway, not as a client that left.
        self.stopping = False

    async def settle(self, timeout_s: float) -> int:
        """Record every call still open once the server stopped; how many were cut.

        The server cancels the requests that outlive its graceful shutdown; their
        clean-up records them as it runs. What is still open after `timeout_s`
        (a response never started, so its clean-up never ran) is recorded here,
        with the error `gateway_shutdown`.
        """
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._none_open.wait(), timeout_s)
        cut = list(self._open.values())
        for call in cut:
            if call.outcome.error is None:
                call.outcome.error = ErrorInfo(
                    type="gateway_shutdown",
                    message="the gateway stopped before the call ended",
                )
            self.finish(call)
        return len(cut)

    async def handle(self, request: Request) -> Response:
        """Answer one chat completion request (ASGI), as a Starlette response."""
        reply = await self.reply(
            request.headers, lambda: self.gatekeeper.read_body(request)
        )
        return reply.to_response()

    async def serve(
        self, headers: Mapping[str, str], read_body: Callable[[], Awaitable[bytes]]
    ) -> ChatReply:
        """`reply`, with any failure turned into an error reply in OpenAI's shape."""
        try:
            return await self.reply(headers, read_body)
        except GatewayError as error:
            return error_reply(error)
        except Exception:
            # What Starlette's error middleware would do, in OpenAI's shape.
            logger.exception("chat request failed unexpectedly")
            return error_reply(GatewayError("internal error in the gateway"))

    async def reply(
        self, headers: Mapping[str, str], read_body: Callable[[], Awaitable[bytes]]
    ) -> ChatReply:
        """Answer one chat completion request.

        `headers` by lowercase name; `read_body` returns the whole body or raises
        PayloadTooLargeError. Once the reply was sent (or sending failed), the
        server calls `sent` with its interaction id.
        """
        started_s, started_at = time.perf_counter(), utc_now()
        try:
            project_id = self.gatekeeper.authenticate_headers(headers)
            chat = parse_chat_request(await read_body())
            route = self.gatekeeper.find_route(chat.route)
        except GatewayError as error:
            # No route yet: the label stays empty so clients cannot mint label values.
            REQUESTS.labels(route="", variant="", status=str(error.status_code)).inc()
            return error_reply(error)

        identity = identify(chat, headers)
        bucket = bucket_of(route.name, identity.sticky_key)
        call = _Call(
            chat=chat,
            project_id=project_id,
            route=route,
            variant=route.assign(bucket),
            bucket=bucket,
            identity=identity,
            started_s=started_s,
            started_at=started_at,
        )
        self.gatekeeper.recent.remember(call.interaction_id, project_id)
        self._open[call.key] = call
        self._none_open.clear()
        try:
            if chat.stream:
                return await self._stream(call)
            return await self._complete(call)
        except BaseException:
            # Cancelled before a response existed (the client left, or the server
            # stopped): still recorded, once.
            if call.outcome.error is None:
                call.outcome.error = ErrorInfo(
                    type="cancelled",
                    message="the request was cancelled before its answer",
                )
            self.finish(call)
            raise

    async def _complete(self, call: _Call) -> ChatReply:
        interaction_id = call.key
        headers = {INTERACTION_ID_HEADER: interaction_id}
        upstream_started_s = time.perf_counter()
        try:
            answer = await self._send(call, self._upstream.complete)
        except GatewayError as error:
            call.status_code = error.status_code
            call.fail(error)
            reply = error_reply(error, headers, interaction_id)
        else:
            call.outcome.add_completion(answer)
            answer["id"] = interaction_id
            reply = ChatReply(
                200, headers, orjson.dumps(answer), interaction_id=interaction_id
            )
        self._observe_upstream(call, upstream_started_s)
        # The event is built and queued after the reply is sent (see `sent`).
        return reply

    async def _stream(self, call: _Call) -> ChatReply:
        interaction_id = call.key
        headers = {INTERACTION_ID_HEADER: interaction_id}
        upstream_started_s = time.perf_counter()
        try:
            upstream_response = await self._send(call, self._upstream.open_stream)
        except GatewayError as error:
            call.status_code = error.status_code
            call.fail(error)
            return error_reply(error, headers, interaction_id)
        finally:
            self._observe_upstream(call, upstream_started_s)

        call.upstream_response = upstream_response
        return ChatReply(
            200,
            {**headers, "Cache-Control": "no-cache"},
            stream=self._relay(upstream_response, call),
            interaction_id=interaction_id,
            upstream_done=upstream_response.finished,
        )

    async def _relay(
        self, upstream_response: UpstreamResponse, call: _Call
    ) -> AsyncIterator[bytes]:
        call.relayed = True
        try:
            async for piece in relay_stream(
                upstream_response,
                call.outcome,
                variant=call.variant,
                interaction_id=call.key,
                client_wants_usage=call.chat.client_wants_usage,
                started_s=call.started_s,
            ):
                yield piece
        except GatewayError as error:
            logger.warning(
                "upstream stream broke off interaction_id=%s code=%s",
                call.interaction_id,
                error.code,
            )
            call.fail(error)
            yield b"data: " + orjson.dumps(error.to_body()) + b"\n\n"
        except BaseException:
            # Cancelled mid-stream: the client went away, or the server's graceful
            # shutdown ran out. Recorded as such by `sent`, which the server calls
            # however sending ended.
            call.outcome.error = (
                ErrorInfo(
                    type="gateway_shutdown",
                    message="the gateway stopped before the answer was complete",
                )
                if self.stopping
                else ErrorInfo(
                    type="client_disconnected", message="the client left mid-stream"
                )
            )
            raise
        finally:
            # Nothing awaited here: a cancelled stream may be cancelled again.
            if upstream_response.at_eof():
                upstream_response.release()  # the connection goes back to the pool
            else:
                upstream_response.close()

    async def _send(self, call: _Call, send: _Send[_T]) -> _T:
        """`send` to the call's variant, retried, then to the route's fallbacks.

        When a fallback answers, the call's variant becomes the fallback's and each
        variant that failed for good is recorded as an interaction of its own, with
        its error (so that its error rate counts it), before the call goes on.
        """
        fallbacks = (
            [v for v in call.route.variants if v.name != call.variant.name]
            if self._settings.upstream_fallback
            else []
        )
        while True:
            try:
                return await self._send_retrying(call, call.variant, send)
            except GatewayError as error:
                if not fallbacks or not _may_fall_back(error):
                    raise
                fallback = fallbacks.pop(0)
                logger.warning(
                    "upstream failed, falling back route=%s variant=%s fallback=%s "
                    "error=%s",
                    call.route.name,
                    call.variant.name,
                    fallback.name,
                    error.code or error.error_type,
                )
                UPSTREAM_FALLBACKS.labels(
                    route=call.route.name,
                    variant=call.variant.name,
                    fallback=fallback.name,
                ).inc()
                self._record_failed_try(call, error)
                call.fallback_from = call.fallback_from or call.variant.name
                call.variant = fallback

    async def _send_retrying(
        self, call: _Call, variant: Variant, send: _Send[_T]
    ) -> _T:
        body = upstream_body(call.chat, variant)
        settings = self._settings
        attempt = 0
        while True:
            try:
                return await send(variant, body)
            except GatewayError as error:
                if attempt >= settings.upstream_retries or not _may_retry(error):
                    raise
            UPSTREAM_RETRIES.labels(route=call.route.name, variant=variant.name).inc()
            ceiling_s = min(
                settings.upstream_retry_backoff_max_s,
                settings.upstream_retry_backoff_s * 2**attempt,
            )
            await asyncio.sleep(random.uniform(0, ceiling_s))  # noqa: S311 (jitter)
            attempt += 1

    def _record_failed_try(self, call: _Call, error: GatewayError) -> None:
        """The failed try of `call` on its current variant, as an interaction."""
        failed = dataclasses.replace(
            call,
            interaction_id=uuid.uuid4(),
            outcome=Outcome(),
            status_code=error.status_code,
            finished=False,
        )
        failed.fail(error)
        self.finish(failed)

    def _observe_upstream(self, call: _Call, upstream_started_s: float) -> None:
        _child(UPSTREAM_SECONDS, call.route.name, call.variant.name).observe(
            time.perf_counter() - upstream_started_s
        )

    def sent(self, interaction_id: str | None) -> None:
        """Record the call of a response whose sending ended, however it ended.

        Every call is recorded here once its answer is out (for a stream: after its
        last chunk, so that building the event is not in the answer's way). A
        stream whose relay never started (the client left before the first byte)
        is recorded as such, its upstream answer closed. Synchronous: this may run
        inside a cancellation.
        """
        call = self._open.get(interaction_id) if interaction_id else None
        if call is None:
            return
        if call.upstream_response is not None and not call.relayed:
            if call.outcome.error is None:
                call.outcome.error = ErrorInfo(
                    type="client_disconnected",
                    message="the client left before the answer",
                )
            call.upstream_response.close()
        self.finish(call)

    def finish(self, call: _Call) -> None:
        """Record a call, exactly once: its metrics and its Interaction event."""
        if call.finished:
            return
        call.finished = True
        self._open.pop(call.key, None)
        if not self._open:
            self._none_open.set()
        latency_s = time.perf_counter() - call.started_s
        route, variant = call.route.name, call.variant.name
        _child(REQUESTS, route, variant, str(call.status_code)).inc()
        _child(REQUEST_SECONDS, route, variant).observe(latency_s)
        if call.outcome.error is not None:
            level = logging.ERROR if call.status_code >= 500 else logging.WARNING
            logger.log(
                level,
                "chat request failed interaction_id=%s route=%s variant=%s status=%d "
                "error=%s",
                call.interaction_id,
                call.route.name,
                call.variant.name,
                call.status_code,
                call.outcome.error.type,
            )
        record = CallRecord(
            interaction_id=call.interaction_id,
            project_id=call.project_id,
            request=call.chat,
            identity=call.identity,
            route=call.route,
            variant=call.variant,
            bucket=call.bucket,
            outcome=call.outcome,
            started_at=call.started_at,
            finished_at=utc_now(),
            latency_s=latency_s,
            fallback_from=call.fallback_from,
        )
        try:
            event = build_interaction(
                record, pseudonym_key=self._pseudonym_key, prices=self._settings.prices
            )
        except Exception:
            # A bug, not bad input (limits are cut to): loud, and counted as lost.
            logger.exception(
                "interaction event could not be built interaction_id=%s",
                call.interaction_id,
            )
            EVENTS_DROPPED.labels(topic=self._topic, reason="unbuildable").inc()
            return
        self._publisher.publish(self._topic, call.key, event)
