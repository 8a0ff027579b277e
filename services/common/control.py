"""Control-plane plumbing: authenticated gRPC channels and the server-side check."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from services.common.settings import ControlPlaneSettings

AUTH_HEADER = "authorization"


def auth_metadata(settings: ControlPlaneSettings) -> tuple[tuple[str, str], ...]:
    """The metadata every control-plane call carries."""
    return ((AUTH_HEADER, f"Bearer {settings.token.get_secret_value()}"),)


def open_channel(settings: ControlPlaneSettings) -> aio.Channel:
    """A channel to the trainer's control plane, TLS when configured."""
    options = [
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]
    if not settings.tls:
        return aio.insecure_channel(settings.address, options=options)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(settings.tls_ca_file),
        private_key=_read(settings.tls_key_file),
        certificate_chain=_read(settings.tls_cert_file),
    )
    return aio.secure_channel(settings.address, credentials, options=options)


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


class TokenAuthInterceptor(aio.ServerInterceptor):  # type: ignore[misc]  # untyped base
    """Refuses every call whose `authorization` metadata is not the bearer token."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

        async def refuse(request: Any, context: aio.ServicerContext) -> Any:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token"
            )

        self._refusal_unary = grpc.unary_unary_rpc_method_handler(refuse)
        self._refusal_stream = grpc.unary_stream_rpc_method_handler(refuse)

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        presented = dict(handler_call_details.invocation_metadata or ()).get(
            AUTH_HEADER, ""
        )
        if hmac.compare_digest(str(presented).encode(), self._expected):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is not None and handler.response_streaming:
            return self._refusal_stream
        return self._refusal_unary


def server_credentials(settings: ControlPlaneSettings) -> grpc.ServerCredentials | None:
    """TLS credentials for the control-plane server, or None for plaintext."""
    if not settings.tls:
        return None
    key, cert = _read(settings.tls_key_file), _read(settings.tls_cert_file)
    if key is None or cert is None:
        raise ValueError(
            "control.tls is on: set control.tls_key_file and control.tls_cert_file"
        )
    return grpc.ssl_server_credentials(((key, cert),))
