"""Feedback and self-logged interactions: validation and event building."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from services.common.events import (
    MAX_TEXT_CHARS,
    ChatMessage,
    ErrorInfo,
    Feedback,
    FeedbackKind,
    Interaction,
    ShortText,
    Usage,
    utc_now,
)
from services.gateway.errors import InvalidRequestError
from services.gateway.handlers import (
    cost_usd,
    describe_validation_error,
    pseudonymize,
)
from services.gateway.pii import mask_text, mask_value
from services.gateway.settings import ModelPrice

# Implicit signals carry a fixed meaning when the application sends no value.
_DEFAULT_VALUES = {FeedbackKind.COPY: 1.0, FeedbackKind.REGENERATE: -1.0}


class FeedbackIn(BaseModel):
    """One feedback item as an application posts it."""

    model_config = ConfigDict(extra="forbid")

    interaction_id: uuid.UUID
    kind: FeedbackKind
    value: float | None = Field(default=None, ge=-1, le=1)
    text: str | None = Field(default=None, max_length=MAX_TEXT_CHARS)
    user: ShortText | None = None
    # Lets an application retry a post without counting the feedback twice.
    event_id: uuid.UUID | None = None

    @model_validator(mode="after")
    def _check_value_for_kind(self) -> FeedbackIn:
        kind, value = self.kind, self.value
        if kind is FeedbackKind.THUMBS and value not in (-1.0, 1.0):
            raise ValueError("thumbs feedback needs value 1 (up) or -1 (down)")
        if kind is FeedbackKind.SCORE and (value is None or value < 0):
            raise ValueError("score feedback needs a value between 0 and 1")
        needs_text = kind in (FeedbackKind.COMMENT, FeedbackKind.CORRECTION)
        if needs_text and not (self.text and self.text.strip()):
            raise ValueError(f"{kind.value} feedback needs a non-empty text")
        return self


class InteractionIn(BaseModel):
    """An interaction an application logs after calling a model itself."""

    model_config = ConfigDict(extra="forbid")

    interaction_id: uuid.UUID | None = None
    event_id: uuid.UUID | None = None
    route: ShortText
    variant: ShortText = "external"
    model_version: ShortText | None = None
    upstream_model: ShortText | None = None
    experiment_id: ShortText | None = None
    arm: ShortText | None = None
    request_messages: list[ChatMessage] = Field(min_length=1)
    request_params: dict[str, Any] = Field(default_factory=dict)
    response_text: str | None = Field(default=None, max_length=MAX_TEXT_CHARS)
    finish_reason: ShortText | None = None
    error: ErrorInfo | None = None
    usage: Usage = Field(default_factory=Usage)
    cost_usd: float | None = Field(default=None, ge=0)
    latency_s: float = Field(ge=0)
    time_to_first_token_s: float | None = Field(default=None, ge=0)
    stream: bool = False
    metadata: dict[str, ShortText] = Field(default_factory=dict)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    user: ShortText | None = None
    session: ShortText | None = None


def parse_items(
    body: dict[str, Any], *, batch_field: str, model: type[BaseModel], max_items: int
) -> list[Any]:
    """One object or `{batch_field: [...]}`, each validated against `model`."""
    if batch_field in body:
        items = body[batch_field]
        if not isinstance(items, list) or not items:
            raise InvalidRequestError(
                f"{batch_field}: expected a non-empty list", param=batch_field
            )
        if len(items) > max_items:
            raise InvalidRequestError(
                f"{batch_field}: at most {max_items} items a request, got {len(items)}",
                param=batch_field,
            )
        prefixes = [f"{batch_field}.{index}" for index in range(len(items))]
    else:
        items, prefixes = [body], [""]
    parsed = []
    for prefix, item in zip(prefixes, items, strict=True):
        try:
            parsed.append(model.model_validate(item))
        except ValidationError as error:
            message = describe_validation_error(error, prefix)
            raise InvalidRequestError(message, param=prefix or None) from error
    return parsed


def build_feedback(
    item: FeedbackIn,
    *,
    project_id: str,
    fallback_user: str | None,
    pseudonym_key: bytes,
) -> Feedback:
    """The Feedback event: user pseudonymized, text masked."""
    user = item.user or fallback_user
    value = item.value if item.value is not None else _DEFAULT_VALUES.get(item.kind)
    return Feedback(
        event_id=item.event_id or uuid.uuid4(),
        interaction_id=item.interaction_id,
        project_id=project_id,
        kind=item.kind,
        value=value,
        text=mask_text(item.text) if item.text is not None else None,
        user_id=pseudonymize(pseudonym_key, "user", user) if user else None,
    )


def build_logged_interaction(
    item: InteractionIn,
    *,
    project_id: str,
    pseudonym_key: bytes,
    prices: dict[str, ModelPrice],
) -> Interaction:
    """The Interaction event of a logged call: pseudonymous, personal data masked."""
    finished_at = item.finished_at or utc_now()
    started_at = item.started_at or finished_at - timedelta(seconds=item.latency_s)
    cost = item.cost_usd
    if cost is None:
        cost = cost_usd(prices, item.upstream_model or "", item.usage)
    messages = [
        mask_value(message.model_dump(exclude_none=True))
        for message in item.request_messages
    ]
    error = item.error
    if error is not None:
        error = error.model_copy(update={"message": mask_text(error.message)})
    return Interaction(
        event_id=item.event_id or uuid.uuid4(),
        interaction_id=item.interaction_id or uuid.uuid4(),
        project_id=project_id,
        session_id=_maybe(pseudonym_key, "session", item.session),
        user_id=_maybe(pseudonym_key, "user", item.user),
        route=item.route,
        variant=item.variant,
        model_version=item.model_version,
        upstream_model=item.upstream_model,
        experiment_id=item.experiment_id,
        arm=item.arm,
        request_messages=messages,
        request_params=mask_value(item.request_params),
        response_text=mask_text(item.response_text) if item.response_text else None,
        finish_reason=item.finish_reason,
        error=error,
        usage=item.usage,
        cost_usd=cost,
        latency_s=item.latency_s,
        time_to_first_token_s=item.time_to_first_token_s,
        stream=item.stream,
        metadata={key: mask_text(value) for key, value in item.metadata.items()},
        started_at=started_at,
        finished_at=finished_at,
    )


def _maybe(secret: bytes, kind: str, value: str | None) -> str | None:
    return pseudonymize(secret, kind, value) if value else None
