"""The Kafka event contracts: one pydantic model per event, the single source of truth.

The JSON Schema files under `proto/schemas/` are generated from these models
(`make schemas`) and a test fails when they drift.

Versioning rule: `schema_version` is an integer per event type. A consumer accepts
every version up to the one it knows; a newer version than it knows goes to the
dead-letter topic with reason `unsupported_schema_version` (it is never guessed at),
and is replayed from there once the consumer is upgraded.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

INTERACTION_SCHEMA_VERSION = 1
FEEDBACK_SCHEMA_VERSION = 1
DEAD_LETTER_SCHEMA_VERSION = 1

MAX_TEXT_CHARS = 200_000

Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
ShortText = Annotated[str, Field(max_length=256)]


def new_id() -> str:
    """A fresh random id, as a string (UUID4)."""
    return str(uuid.uuid4())


def utc_now() -> datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.now(UTC)


class EventModel(BaseModel):
    """Base of every event: strict about shape, forgiving of extra fields."""

    # Extra fields are kept (not rejected) so that a producer one minor step ahead
    # of a consumer does not dead-letter; the schema version says when it must.
    model_config = ConfigDict(extra="allow", frozen=True)


class ChatMessage(BaseModel):
    """One message of a chat request or response, as OpenAI's API shapes it."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: ShortText | None = None


class Usage(BaseModel):
    """Token counts reported by the upstream model."""

    prompt_tokens: int = Field(default=0, ge=0)
    completion_tokens: int = Field(default=0, ge=0)
    total_tokens: int = Field(default=0, ge=0)


class ErrorInfo(BaseModel):
    """Why an interaction failed: an upstream status or a gateway-side failure."""

    type: ShortText
    message: Text
    status_code: int | None = None


class Interaction(EventModel):
    """One model call through the gateway (or logged by an application itself)."""

    schema_version: int = Field(default=INTERACTION_SCHEMA_VERSION, ge=1)
    event_id: uuid.UUID = Field(default_factory=uuid.uuid4)
    interaction_id: uuid.UUID = Field(default_factory=uuid.uuid4)
    project_id: ShortText
    session_id: ShortText | None = None
    user_id: ShortText | None = Field(
        default=None, description="Pseudonymous user id (keyed HMAC), never the raw id."
    )
    route: ShortText = Field(description="The `model` name the application asked for.")
    variant: ShortText = Field(description="The routing-table variant that served it.")
    model_version: ShortText | None = None
    upstream_model: ShortText | None = None
    experiment_id: ShortText | None = None
    arm: ShortText | None = None
    bucket: int | None = Field(default=None, ge=0, lt=10_000)
    request_messages: list[ChatMessage]
    request_params: dict[str, Any] = Field(default_factory=dict)
    response_text: Text | None = None
    finish_reason: ShortText | None = None
    error: ErrorInfo | None = None
    usage: Usage = Field(default_factory=Usage)
    # Finite: JSON's 1e400 parses as infinity, which would poison every sum.
    cost_usd: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    latency_s: float = Field(
        ge=0, allow_inf_nan=False, description="Request received to last byte sent."
    )
    time_to_first_token_s: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    stream: bool = False
    metadata: dict[str, ShortText] = Field(default_factory=dict)
    started_at: datetime
    finished_at: datetime


class FeedbackKind(StrEnum):
    """What kind of signal a user (or the application on their behalf) gave."""

    THUMBS = "thumbs"
    SCORE = "score"
    COMMENT = "comment"
    CORRECTION = "correction"
    COPY = "copy"
    REGENERATE = "regenerate"
    EDIT = "edit"


class Feedback(EventModel):
    """A user's signal about one interaction.

    `value` means: thumbs +1 or -1; score in [0, 1]; implicit signals +1 (copy) or
    -1 (regenerate); comment and correction carry text in `text` and no value.
    """

    schema_version: int = Field(default=FEEDBACK_SCHEMA_VERSION, ge=1)
    event_id: uuid.UUID = Field(default_factory=uuid.uuid4)
    interaction_id: uuid.UUID
    project_id: ShortText
    kind: FeedbackKind
    value: float | None = Field(default=None, ge=-1, le=1)
    text: Text | None = None
    user_id: ShortText | None = None
    created_at: datetime = Field(default_factory=utc_now)

    def is_positive(self) -> bool | None:
        """Whether this feedback counts as positive; None when it is not a rating."""
        if self.value is None:
            return None
        if self.kind is FeedbackKind.SCORE:
            return self.value >= 0.5
        if self.kind in (FeedbackKind.THUMBS, FeedbackKind.COPY):
            return self.value > 0
        if self.kind is FeedbackKind.REGENERATE:
            return False
        return None


class DeadLetter(EventModel):
    """An input that could not be processed, with everything needed to replay it."""

    schema_version: int = Field(default=DEAD_LETTER_SCHEMA_VERSION, ge=1)
    event_id: uuid.UUID = Field(default_factory=uuid.uuid4)
    reason: ShortText
    detail: Text
    source_topic: ShortText
    source_partition: int
    source_offset: int
    original_key_b64: str | None = None
    original_value_b64: str
    consumer: ShortText
    created_at: datetime = Field(default_factory=utc_now)


class ExperimentResult(EventModel):
    """A snapshot of a live experiment, published by the analyzer."""

    schema_version: int = Field(default=1, ge=1)
    event_id: uuid.UUID = Field(default_factory=uuid.uuid4)
    experiment_id: ShortText
    route: ShortText
    decision: Literal["continue", "promote", "roll_back"]
    reason: Text
    arms: list[dict[str, Any]]
    lift: float
    lift_low: float
    lift_high: float
    p_value: float
    srm_p_value: float
    computed_at: datetime = Field(default_factory=utc_now)


EVENT_MODELS: dict[str, type[EventModel]] = {
    "interaction": Interaction,
    "feedback": Feedback,
    "dead_letter": DeadLetter,
    "experiment_result": ExperimentResult,
}


def encode(event: EventModel) -> bytes:
    """Serialize an event to its wire format (UTF-8 JSON)."""
    return event.model_dump_json(exclude_none=True).encode()
