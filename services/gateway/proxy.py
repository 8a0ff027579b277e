"""Talking to the upstream model: one pooled HTTP client, errors mapped, SSE relayed.

The client is the gateway's own (`upstream_http.py`, on httptools): per call it
spends a fraction of what aiohttp's did, which spent a fifth of httpx's (90 against
500 microseconds against the peerbench stub on this project's 2-core machine); the
gateway's hot path is mostly this call.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import orjson
from pydantic import SecretStr

from services.common.routing import Variant
from services.gateway.errors import (
    BadUpstreamResponseError,
    UpstreamBrokeOffError,
    UpstreamError,
    UpstreamTimeoutError,
    UpstreamUnreachableError,
)
from services.gateway.handlers import Outcome, error_info_from_body
from services.gateway.upstream_http import (
    BodyBrokenError,
    ConnectError,
    Endpoint,
    HttpClient,
    ReadTimeoutError,
    TooLargeError,
    UpstreamHttpError,
    UpstreamResponse,
)

logger = logging.getLogger(__name__)

_DONE = b"data: [DONE]\n\n"


class UpstreamClient:
    """Sends chat completions to a variant's OpenAI-compatible base URL.

    One pool of keep-alive connections serves every call (opened on the first one,
    closed by `close`). `timeout_s` bounds each wait for the upstream (the answer's
    headers, then every read of its body), `connect_timeout_s` the connection.
    """

    def __init__(
        self,
        *,
        api_keys: dict[str, SecretStr],
        timeout_s: float,
        connect_timeout_s: float,
        max_connections: int,
        max_response_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self._api_keys = api_keys
        self._http = HttpClient(
            connect_timeout_s=connect_timeout_s,
            read_timeout_s=timeout_s,
            max_connections=max_connections,
            keepalive_s=30.0,
        )
        self._max_response_bytes = max_response_bytes
        # By base URL: where its calls go and their header lines.
        self._targets: dict[str, tuple[Endpoint, bytes]] = {}

    async def close(self) -> None:
        """Close the pool; idempotent."""
        await self._http.close()

    def _target(self, variant: Variant) -> tuple[Endpoint, bytes]:
        target = self._targets.get(variant.base_url)
        if target is None:
            url = variant.base_url.rstrip("/") + "/chat/completions"
            try:
                endpoint = Endpoint.of(url)
            except ValueError as error:
                raise ConnectError(f"not a usable upstream URL: {url!r}") from error
            head = (
                b"content-type: application/json\r\naccept: application/json\r\n"
                b"accept-encoding: identity\r\n"
            )
            key = self._api_keys.get(variant.base_url)
            if key is not None:
                head += f"authorization: Bearer {key.get_secret_value()}\r\n".encode()
            target = self._targets[variant.base_url] = (endpoint, head)
        return target

    async def _post(self, variant: Variant, body: bytes) -> UpstreamResponse:
        endpoint, head = self._target(variant)
        return await self._http.post(endpoint, head, body)

    async def complete(self, variant: Variant, body: bytes) -> dict[str, Any]:
        """A non-streamed completion's body; GatewayError when it failed."""
        with mapped_transport_errors(variant):
            response = await self._post(variant, body)
            try:
                content = await response.read(self._max_response_bytes)
            except BaseException:
                response.close()
                raise
        if response.status >= 400:
            raise upstream_error(response.status, content)
        try:
            answer = orjson.loads(content)
        except orjson.JSONDecodeError as error:
            raise BadUpstreamResponseError(
                f"upstream {variant.name} answered {response.status} with a "
                "body that is not JSON"
            ) from error
        if not isinstance(answer, dict):
            raise BadUpstreamResponseError(
                f"upstream {variant.name} answered with a JSON {type(answer).__name__}"
            )
        return answer

    async def open_stream(self, variant: Variant, body: bytes) -> UpstreamResponse:
        """An open streamed response with status 2xx; GatewayError otherwise."""
        with mapped_transport_errors(variant):
            response = await self._post(variant, body)
            if response.status >= 400:
                try:
                    content = await response.read(self._max_response_bytes)
                except BaseException:
                    response.close()
                    raise
                raise upstream_error(response.status, content)
        return response


@contextlib.contextmanager
def mapped_transport_errors(variant: Variant) -> Iterator[None]:
    """Turn the HTTP client's errors into the gateway's upstream errors."""
    try:
        yield
    except ConnectError as error:
        raise UpstreamUnreachableError(
            f"upstream {variant.name} at {variant.base_url} is unreachable"
        ) from error
    except BodyBrokenError as error:
        raise UpstreamBrokeOffError(
            f"upstream {variant.name} broke off its answer: {error}"
        ) from error
    except ReadTimeoutError as error:
        raise UpstreamTimeoutError(
            f"upstream {variant.name} did not answer within upstream_timeout_s"
        ) from error
    except TooLargeError as error:
        raise BadUpstreamResponseError(
            f"upstream {variant.name} answered more than {error.limit} bytes "
            "(upstream_max_response_bytes)"
        ) from error
    except UpstreamHttpError as error:
        # Closed before answering, or not HTTP: nothing was done, it may be retried.
        raise UpstreamUnreachableError(
            f"upstream {variant.name} broke off: {error}"
        ) from error


def upstream_error(status_code: int, content: bytes) -> UpstreamError:
    """The client-facing error for an upstream error status, its message kept."""
    try:
        body: Any = orjson.loads(content)
    except orjson.JSONDecodeError:
        body = content.decode(errors="replace")[:2000]
    info = error_info_from_body(body, status_code=status_code)
    error = body.get("error") if isinstance(body, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return UpstreamError(
        info.message or f"upstream answered {status_code}",
        status_code=status_code,
        error_type=info.type,
        code=str(code) if code is not None else None,
    )


async def relay_stream(
    response: UpstreamResponse,
    outcome: Outcome,
    *,
    variant: Variant,
    interaction_id: str,
    client_wants_usage: bool,
    started_s: float,
) -> AsyncIterator[bytes]:
    """Forward an upstream SSE stream as it arrives, collecting the answer.

    Each chunk's `id` becomes the interaction id; usage is stripped unless the client
    asked for it (the gateway always asks upstream). What one read of the upstream
    brought is relayed at once, as one piece: no chunk waits for a later one.
    """
    relay = _ChunkRelay(outcome, variant, interaction_id, client_wants_usage, started_s)
    with mapped_transport_errors(variant):
        pending = b""
        async for data in response.iter_any():
            pending += data
            *lines, pending = pending.split(b"\n")
            out = relay.lines(lines)
            if out:
                yield out
            if relay.error is not None:
                raise relay.error
        if pending:
            out = relay.lines([pending])
            if out:
                yield out
            if relay.error is not None:
                raise relay.error


class _ChunkRelay:
    """Turns upstream SSE lines into what the client gets, noting the answer."""

    __slots__ = (
        "_client_wants_usage",
        "_interaction_id",
        "_outcome",
        "_started_s",
        "_variant",
        "error",
    )

    def __init__(
        self,
        outcome: Outcome,
        variant: Variant,
        interaction_id: str,
        client_wants_usage: bool,
        started_s: float,
    ) -> None:
        self._outcome = outcome
        self._variant = variant
        self._interaction_id = interaction_id
        self._client_wants_usage = client_wants_usage
        self._started_s = started_s
        # A chunk that ended the stream; the lines before it were relayed.
        self.error: BadUpstreamResponseError | None = None

    def lines(self, lines: list[bytes]) -> bytes:
        """What to send for these complete lines (without their line ends)."""
        out: list[bytes] = []
        outcome = self._outcome
        for raw in lines:
            line = raw.rstrip(b"\r")
            if not line:
                continue
            if not line.startswith(b"data:"):
                # Comments and other fields pass as they came.
                out.append(line + b"\n")
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                out.append(_DONE)
                continue
            try:
                chunk = orjson.loads(payload)
            except orjson.JSONDecodeError:
                # Invalid UTF-8 inside is replaced, as a lenient client would.
                try:
                    chunk = orjson.loads(payload.decode(errors="replace"))
                except orjson.JSONDecodeError:
                    chunk = None
            if not isinstance(chunk, dict):
                # OpenAI's clients fail on such a chunk with a parse error of their
                # own; the stream ends here with an error chunk in OpenAI's shape.
                self.error = BadUpstreamResponseError(
                    f"upstream {self._variant.name} sent a stream chunk that is not "
                    "a JSON object"
                )
                break
            if outcome.add_chunk(chunk) and outcome.time_to_first_token_s is None:
                outcome.time_to_first_token_s = time.perf_counter() - self._started_s
            if not self._client_wants_usage and "usage" in chunk:
                del chunk["usage"]
                if not chunk.get("choices"):
                    continue
            if "id" in chunk:
                chunk["id"] = self._interaction_id
            out.append(b"data: " + orjson.dumps(chunk) + b"\n\n")
        return b"".join(out)
