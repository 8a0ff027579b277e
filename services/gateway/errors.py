"""The gateway's errors, each rendered in OpenAI's error shape."""

from __future__ import annotations

import math
from typing import Any

from services.common.openai_errors import error_body


class GatewayError(Exception):
    """Base of every error the gateway answers a client with."""

    status_code = 500
    error_type = "server_error"
    code: str | None = None
    # Whether the client may retry the same request and expect it to work.
    retriable = False

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    @property
    def headers(self) -> dict[str, str]:
        """Extra response headers the error comes with."""
        return {}

    def to_body(self) -> dict[str, Any]:
        """The JSON body OpenAI's API answers errors with."""
        return error_body(
            self.message, error_type=self.error_type, param=self.param, code=self.code
        )


class InvalidRequestError(GatewayError):
    """The request's body is not JSON, has wrong types or misses a field."""

    status_code = 400
    error_type = "invalid_request_error"


class AuthenticationError(GatewayError):
    """No API key, or one the gateway does not know."""

    status_code = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"


class ModelNotFoundError(GatewayError):
    """The `model` names no route of the routing table."""

    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class InteractionNotFoundError(GatewayError):
    """Feedback names an interaction this key's project does not own (or unknown)."""

    status_code = 404
    error_type = "invalid_request_error"
    code = "interaction_not_found"


class InteractionIdTakenError(GatewayError):
    """A logged interaction reuses an id another project's interaction has."""

    status_code = 409
    error_type = "invalid_request_error"
    code = "interaction_id_taken"


class RateLimitError(GatewayError):
    """The key (or its project) sent more requests than its rate limit allows."""

    status_code = 429
    error_type = "requests"
    code = "rate_limit_exceeded"
    retriable = True

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str]:
        # Whole seconds, rounded up, as HTTP wants; at least 1.
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


class PayloadTooLargeError(GatewayError):
    """The body is larger than `max_body_bytes`."""

    status_code = 413
    error_type = "invalid_request_error"
    code = "request_too_large"


class NotReadyError(GatewayError):
    """The gateway holds no routing table yet."""

    status_code = 503
    error_type = "server_error"
    code = "not_ready"
    retriable = True


class UpstreamError(GatewayError):
    """The upstream model answered with an error status; passed on with that status."""

    error_type = "upstream_error"

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        error_type: str | None = None,
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message, param=param)
        self.status_code = status_code
        self.error_type = error_type or self.error_type
        self.code = code
        self.retriable = status_code == 429 or status_code >= 500


class UpstreamUnreachableError(GatewayError):
    """The upstream could not be connected to, or broke off mid-answer."""

    status_code = 502
    error_type = "upstream_error"
    code = "upstream_unreachable"
    retriable = True


class UpstreamBrokeOffError(UpstreamUnreachableError):
    """The upstream's answer broke off after it began: the call was made (and maybe
    billed), so the gateway does not send it again; another variant may answer."""


class UpstreamTimeoutError(GatewayError):
    """The upstream did not answer within `upstream_timeout_s`."""

    status_code = 504
    error_type = "upstream_error"
    code = "upstream_timeout"
    retriable = True


class BadUpstreamResponseError(GatewayError):
    """The upstream answered 2xx with a body that is not OpenAI's shape."""

    status_code = 502
    error_type = "upstream_error"
    code = "bad_upstream_response"


class PublisherStartError(RuntimeError):
    """The Kafka producer could not connect at start-up (not a client-facing error)."""

    retriable = True
