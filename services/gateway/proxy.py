"""Talking to the upstream model: one pooled HTTP client, errors mapped, SSE relayed."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import orjson
from pydantic import SecretStr

from services.common.routing import Variant
from services.gateway.errors import (
    BadUpstreamResponseError,
    UpstreamError,
    UpstreamTimeoutError,
    UpstreamUnreachableError,
)
from services.gateway.handlers import Outcome, error_info_from_body

logger = logging.getLogger(__name__)

_DONE = b"data: [DONE]\n\n"


def make_http_client(
    *, timeout_s: float, connect_timeout_s: float, max_connections: int
) -> httpx.AsyncClient:
    """The one client every upstream call shares, with a connection pool."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
        limits=httpx.Limits(
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=30.0,
        ),
        # Never route model traffic through a proxy picked up from the environment.
        trust_env=False,
    )


class UpstreamClient:
    """Sends chat completions to a variant's OpenAI-compatible base URL."""

    def __init__(
        self, client: httpx.AsyncClient, *, api_keys: dict[str, SecretStr]
    ) -> None:
        self._client = client
        self._api_keys = api_keys

    def _request(self, variant: Variant, body: bytes) -> httpx.Request:
        headers = {"content-type": "application/json", "accept": "application/json"}
        key = self._api_keys.get(variant.base_url)
        if key is not None:
            headers["authorization"] = f"Bearer {key.get_secret_value()}"
        url = variant.base_url.rstrip("/") + "/chat/completions"
        return self._client.build_request("POST", url, content=body, headers=headers)

    async def complete(self, variant: Variant, body: bytes) -> dict[str, Any]:
        """A non-streamed completion's body; GatewayError when it failed."""
        with mapped_transport_errors(variant):
            response = await self._client.send(self._request(variant, body))
        if response.status_code >= 400:
            raise upstream_error(response.status_code, response.content)
        try:
            answer = orjson.loads(response.content)
        except orjson.JSONDecodeError as error:
            raise BadUpstreamResponseError(
                f"upstream {variant.name} answered {response.status_code} with a "
                "body that is not JSON"
            ) from error
        if not isinstance(answer, dict):
            raise BadUpstreamResponseError(
                f"upstream {variant.name} answered with a JSON {type(answer).__name__}"
            )
        return answer

    async def open_stream(self, variant: Variant, body: bytes) -> httpx.Response:
        """An open streamed response with status 2xx; GatewayError otherwise."""
        with mapped_transport_errors(variant):
            response = await self._client.send(
                self._request(variant, body), stream=True
            )
            if response.status_code >= 400:
                content = await response.aread()
                await response.aclose()
                raise upstream_error(response.status_code, content)
        return response


@contextlib.contextmanager
def mapped_transport_errors(variant: Variant) -> Iterator[None]:
    """Turn httpx's transport errors into the gateway's upstream errors."""
    try:
        yield
    except (httpx.ConnectTimeout, httpx.ConnectError) as error:
        raise UpstreamUnreachableError(
            f"upstream {variant.name} at {variant.base_url} is unreachable"
        ) from error
    except httpx.TimeoutException as error:
        raise UpstreamTimeoutError(
            f"upstream {variant.name} did not answer within upstream_timeout_s"
        ) from error
    except httpx.HTTPError as error:
        raise UpstreamUnreachableError(
            f"upstream {variant.name} broke off: {type(error).__name__}"
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
    response: httpx.Response,
    outcome: Outcome,
    *,
    variant: Variant,
    interaction_id: str,
    client_wants_usage: bool,
    started_s: float,
) -> AsyncIterator[bytes]:
    """Forward an upstream SSE stream chunk by chunk, collecting the answer.

    Each chunk's `id` becomes the interaction id; usage is stripped unless the client
    asked for it (the gateway always asks upstream).
    """
    with mapped_transport_errors(variant):
        async for line in response.aiter_lines():
            if not line:
                continue
            if not line.startswith("data:"):
                yield line.encode() + b"\n"
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                yield _DONE
                continue
            try:
                chunk = orjson.loads(payload)
            except orjson.JSONDecodeError:
                logger.warning(
                    "upstream sent a chunk that is not JSON, passed on as is"
                )
                yield line.encode() + b"\n\n"
                continue
            if not isinstance(chunk, dict):
                yield line.encode() + b"\n\n"
                continue
            if outcome.add_chunk(chunk) and outcome.time_to_first_token_s is None:
                outcome.time_to_first_token_s = time.perf_counter() - started_s
            if not client_wants_usage and "usage" in chunk:
                del chunk["usage"]
                if not chunk.get("choices"):
                    continue
            if "id" in chunk:
                chunk["id"] = interaction_id
            yield b"data: " + orjson.dumps(chunk) + b"\n\n"
