"""OpenAI's error shape, shared by every HTTP service that speaks OpenAI's API."""

from __future__ import annotations

from typing import Any


def error_body(
    message: str, *, error_type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """The JSON body OpenAI's API answers an error with."""
    return {
        "error": {"message": message, "type": error_type, "param": param, "code": code}
    }
