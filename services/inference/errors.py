"""Errors of the inference server, each mapped to an OpenAI-style HTTP error."""

from __future__ import annotations

from typing import Any

from services.common.openai_errors import error_body


class InferenceError(Exception):
    """Base of the inference server's errors; carries the OpenAI error fields."""

    status_code = 500
    error_type = "server_error"
    retriable = False

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def to_body(self) -> dict[str, Any]:
        """The body OpenAI clients expect: `{"error": {message, type, param, code}}`."""
        return error_body(
            self.message, error_type=self.error_type, param=self.param, code=self.code
        )


class InvalidRequestError(InferenceError):
    """The request is malformed or asks for something this server does not do."""

    status_code = 400
    error_type = "invalid_request_error"


class ModelNotFoundError(InferenceError):
    """The request names neither the base model nor an adapter on disk."""

    status_code = 404
    error_type = "invalid_request_error"

    def __init__(self, model: str) -> None:
        super().__init__(
            f"The model '{model}' does not exist: it is neither the served model nor "
            "an adapter folder under adapters_dir",
            param="model",
            code="model_not_found",
        )


class ModelNotReadyError(InferenceError):
    """The base model is still loading."""

    status_code = 503
    error_type = "service_unavailable"
    retriable = True

    def __init__(self) -> None:
        super().__init__("The model is still loading; retry shortly", code="loading")


class AdapterLoadError(InferenceError):
    """An adapter folder exists but could not be loaded onto the base model."""

    status_code = 500
    error_type = "server_error"
