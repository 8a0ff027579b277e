"""Pure request and response processing: parsing, pseudonyms, cost, event building.

Nothing here touches the network; `proxy.py` and `api.py` call these functions.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
from pydantic import TypeAdapter, ValidationError

from services.common.events import (
    MAX_TEXT_CHARS,
    ChatMessage,
    ErrorInfo,
    Interaction,
    Usage,
)
from services.common.routing import Route, Variant
from services.gateway.errors import InvalidRequestError
from services.gateway.pii import mask_text, mask_value
from services.gateway.settings import ModelPrice

_MESSAGES = TypeAdapter(list[ChatMessage])
MAX_METADATA_CHARS = 256  # ShortText's limit in services.common.events
# Request fields that do not go into `request_params`: the messages have their own
# field, and the raw user id and metadata must not leave in clear.
_NOT_PARAMS = frozenset({"messages", "user", "metadata"})


def describe_validation_error(error: ValidationError, prefix: str) -> str:
    """One line naming the first invalid field and what was wrong with it."""
    first = error.errors()[0]
    location = ".".join(str(part) for part in (prefix, *first["loc"]) if part != "")
    # A model-level check has no field: name the object, and drop pydantic's
    # "Value error, " preamble, which says nothing to a client.
    message = str(first["msg"]).removeprefix("Value error, ")
    return f"{location or 'body'}: {message}"


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or InvalidRequestError saying why it is not one."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise InvalidRequestError(f"the body is not valid JSON: {error}") from error
    if not isinstance(body, dict):
        raise InvalidRequestError(
            f"the body must be a JSON object, got {type(body).__name__}"
        )
    return body


@dataclass(frozen=True)
class ChatRequest:
    """A validated chat completion request, with the parts the gateway acts on."""

    body: dict[str, Any]
    route: str
    messages: list[dict[str, Any]]
    stream: bool
    client_wants_usage: bool
    user: str | None
    metadata: dict[str, str]


def parse_chat_request(raw: bytes) -> ChatRequest:
    """Validate a `/v1/chat/completions` body; InvalidRequestError when it is wrong."""
    body = parse_json_object(raw)
    route = body.get("model")
    if not isinstance(route, str) or not route:
        raise InvalidRequestError("model: expected a route name string", param="model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError(
            "messages: expected a non-empty list of message objects", param="messages"
        )
    try:
        _MESSAGES.validate_python(messages)
    except ValidationError as error:
        message = describe_validation_error(error, "messages")
        raise InvalidRequestError(message, param="messages") from error
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequestError("stream: expected true or false", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise InvalidRequestError(
            "stream_options: expected an object", param="stream_options"
        )
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise InvalidRequestError("user: expected a string", param="user")
    return ChatRequest(
        body=body,
        route=route,
        messages=messages,
        stream=stream,
        client_wants_usage=options.get("include_usage") is True,
        user=user or None,
        metadata=_parse_metadata(body.get("metadata")),
    )


def _parse_metadata(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(item, str) for item in value.values()
    ):
        raise InvalidRequestError(
            "metadata: expected an object of string values", param="metadata"
        )
    return {str(key)[:64]: item[:MAX_METADATA_CHARS] for key, item in value.items()}


def upstream_body(request: ChatRequest, variant: Variant) -> bytes:
    """The body sent upstream: as the client sent it, with the variant's model name.

    Streams always ask for usage so that token counts are known; the usage chunk is
    stripped from what the client sees unless it asked for it too.
    """
    body = dict(request.body)
    body["model"] = variant.upstream_model
    if request.stream:
        body["stream_options"] = {**(body.get("stream_options") or {})}
        body["stream_options"]["include_usage"] = True
    return orjson.dumps(body)


def pseudonymize(secret: bytes, kind: str, value: str) -> str:
    """A stable pseudonym for a user or session id: a keyed HMAC-SHA256, hex."""
    return hmac.new(secret, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Identity:
    """Who a request is from, as far as sticky assignment and the event go."""

    sticky_key: str
    user: str | None
    session: str | None


def identify(request: ChatRequest, headers: Mapping[str, str]) -> Identity:
    """The assignment key: body `user`, else X-Flywheel-User, else the session.

    Without any of them the key is random: the request is assigned fairly but a
    later one from the same person may land on another variant.
    """
    user = request.user or headers.get("x-flywheel-user") or None
    session = headers.get("x-flywheel-session") or None
    return Identity(
        sticky_key=user or session or uuid.uuid4().hex, user=user, session=session
    )


def cost_usd(prices: dict[str, ModelPrice], upstream_model: str, usage: Usage) -> float:
    """What the call cost by the configured prices (0 for a model without one)."""
    price = prices.get(upstream_model)
    if price is None:
        return 0.0
    return (
        usage.prompt_tokens * price.prompt_per_1k_usd
        + usage.completion_tokens * price.completion_per_1k_usd
    ) / 1000


@dataclass
class Outcome:
    """What came back from upstream, accumulated as it arrives."""

    texts: dict[int, list[str]] = field(default_factory=dict)
    finish_reason: str | None = None
    usage: Usage = field(default_factory=Usage)
    error: ErrorInfo | None = None
    time_to_first_token_s: float | None = None

    @property
    def response_text(self) -> str | None:
        parts = self.texts.get(0)
        return "".join(parts) if parts is not None else None

    def add_completion(self, body: dict[str, Any]) -> None:
        """Take the answer of a non-streamed completion body."""
        for choice in body.get("choices") or ():
            message = choice.get("message") or {}
            content = message.get("content")
            if isinstance(content, str):
                self.texts[int(choice.get("index", 0))] = [content]
            if choice.get("index", 0) == 0:
                self.finish_reason = choice.get("finish_reason")
        self._take_usage(body)

    def add_chunk(self, chunk: dict[str, Any]) -> bool:
        """Take one streamed chunk; True when it carried answer text."""
        carried_text = False
        for choice in chunk.get("choices") or ():
            index = int(choice.get("index", 0))
            delta = choice.get("delta") or {}
            content = delta.get("content")
            if isinstance(content, str):
                self.texts.setdefault(index, []).append(content)
                carried_text = carried_text or bool(content)
            if index == 0 and choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        self._take_usage(chunk)
        if isinstance(chunk.get("error"), dict):
            self.error = error_info_from_body(chunk, status_code=None)
        return carried_text

    def _take_usage(self, body: dict[str, Any]) -> None:
        usage = body.get("usage")
        if isinstance(usage, dict):
            # NOTE: a malformed usage object leaves the counts at zero rather than
            # failing a call whose answer the client already has.
            with contextlib.suppress(ValidationError):
                self.usage = Usage.model_validate(usage)


def error_info_from_body(body: Any, *, status_code: int | None) -> ErrorInfo:
    """An ErrorInfo from an OpenAI-shaped error body (or whatever came instead)."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return ErrorInfo(
            type=str(error.get("type") or "upstream_error")[:256],
            message=str(error.get("message") or "")[:10_000],
            status_code=status_code,
        )
    return ErrorInfo(
        type="upstream_error", message=str(body)[:10_000], status_code=status_code
    )


@dataclass(frozen=True)
class CallRecord:
    """Everything known about one proxied call once it is over."""

    interaction_id: uuid.UUID
    project_id: str
    request: ChatRequest
    identity: Identity
    route: Route
    variant: Variant
    bucket: int
    outcome: Outcome
    started_at: datetime
    finished_at: datetime
    latency_s: float
    # The variant the call was routed to when another one answered it instead.
    fallback_from: str | None = None


# Metadata key marking an interaction a fallback variant answered (`build_interaction`).
FALLBACK_FROM_KEY = "flywheel.fallback_from"
# Metadata key naming the fields cut to the event's limits (`build_interaction`).
TRUNCATED_KEY = "flywheel.truncated"


def clip(text: str, limit: int, field: str, truncated: list[str]) -> str:
    """`text` cut to `limit` characters; the field's name noted when it was."""
    if len(text) <= limit:
        return text
    truncated.append(field)
    return text[:limit]


def build_interaction(
    record: CallRecord, *, pseudonym_key: bytes, prices: dict[str, ModelPrice]
) -> Interaction:
    """The Interaction event of a call: pseudonymous, with personal data masked."""
    identity, outcome = record.identity, record.outcome
    # What exceeds the event's limits is cut, not refused: the answer reached the
    # client, so its interaction must reach Kafka too (marked as cut).
    truncated: list[str] = []
    error = outcome.error
    if error is not None:
        message = clip(mask_text(error.message), MAX_TEXT_CHARS, "error", truncated)
        error = error.model_copy(update={"message": message})
    response_text = outcome.response_text
    if response_text is not None:
        response_text = clip(
            mask_text(response_text), MAX_TEXT_CHARS, "response_text", truncated
        )
    metadata = {
        key: clip(mask_text(value), MAX_METADATA_CHARS, f"metadata.{key}", truncated)
        for key, value in record.request.metadata.items()
    }
    if truncated:
        metadata[TRUNCATED_KEY] = ",".join(truncated)[:MAX_METADATA_CHARS]
    in_experiment = record.fallback_from is None
    if record.fallback_from is not None:
        # Answered by a variant the user was not assigned to: it belongs to no arm,
        # so its feedback cannot credit one arm with another's answers.
        metadata[FALLBACK_FROM_KEY] = record.fallback_from
    return Interaction(
        interaction_id=record.interaction_id,
        project_id=record.project_id,
        session_id=_maybe_pseudonym(pseudonym_key, "session", identity.session),
        user_id=_maybe_pseudonym(pseudonym_key, "user", identity.user),
        route=record.route.name,
        variant=record.variant.name,
        model_version=record.variant.model_version or None,
        upstream_model=record.variant.upstream_model,
        experiment_id=(record.route.experiment_id or None) if in_experiment else None,
        arm=(record.variant.arm or None) if in_experiment else None,
        bucket=record.bucket,
        request_messages=[mask_value(message) for message in record.request.messages],
        request_params=mask_value(
            {k: v for k, v in record.request.body.items() if k not in _NOT_PARAMS}
        ),
        response_text=response_text,
        finish_reason=outcome.finish_reason,
        error=error,
        usage=outcome.usage,
        cost_usd=cost_usd(prices, record.variant.upstream_model, outcome.usage),
        latency_s=record.latency_s,
        time_to_first_token_s=outcome.time_to_first_token_s,
        stream=record.request.stream,
        metadata=metadata,
        started_at=record.started_at,
        finished_at=record.finished_at,
    )


def _maybe_pseudonym(secret: bytes, kind: str, value: str | None) -> str | None:
    return pseudonymize(secret, kind, value) if value else None
