"""Pure record processing: bytes in, a valid event or a rejection out; rows for SQL.

No Kafka or database imports here, so every rule is testable on its own. The rules
mirror what PostgreSQL would refuse later, because a record refused inside a batch
insert would otherwise fail the whole batch again on every replay.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import orjson
from pydantic import TypeAdapter, ValidationError

from services.common.events import (
    FEEDBACK_SCHEMA_VERSION,
    INTERACTION_SCHEMA_VERSION,
    ChatMessage,
    DeadLetter,
    Feedback,
    Interaction,
)
from services.common.sealing import Keyring, seal_values

# Columns of `integer` type are 32-bit signed in PostgreSQL.
MAX_INT4 = 2**31 - 1
MAX_DETAIL_CHARS = 2_000
# Bytes that send a record down the full path: how JSON spells a NUL character, and
# the NaN and Infinity literals pydantic's JSON parser takes but strict JSON (and
# the full path) refuses. A false alarm (such text inside a string) only costs time.
FULL_PATH_MARKERS = (b"\\u0000", b"NaN", b"Infinity")
NUL_ESCAPE, NAN, INFINITY = FULL_PATH_MARKERS
BACKSLASH, CAPITAL_N, CAPITAL_I = b"\\", b"N", b"I"
# A dead letter carries at most this much of its record's value (and of its key), so
# that it fits in one Kafka message of the usual 1 MiB limit (base64 adds a third):
# a letter too large to publish would hold up every record behind it.
DEAD_LETTER_MAX_VALUE_BYTES = 512 * 1024
DEAD_LETTER_MAX_KEY_BYTES = 16 * 1024
# Dead letters get a stable id per source record, so a replayed batch re-publishes
# the same dead letter and a reader can de-duplicate it by event_id.
DEAD_LETTER_NAMESPACE = uuid.UUID("6f1c2f4e-5b1a-4c39-9a43-0d7f3c1a2b10")
# Request messages as their jsonb column's text, in one call.
MESSAGES: TypeAdapter[list[ChatMessage]] = TypeAdapter(list[ChatMessage])


class EventKind(StrEnum):
    """Which event a topic carries."""

    INTERACTION = "interaction"
    FEEDBACK = "feedback"


KNOWN_SCHEMA_VERSIONS = {
    EventKind.INTERACTION: INTERACTION_SCHEMA_VERSION,
    EventKind.FEEDBACK: FEEDBACK_SCHEMA_VERSION,
}


# Per kind: the model's JSON validator and the newest schema version this collector
# knows. The validator is pydantic's own, which `model_validate_json` calls with
# five keyword arguments each time (a tenth of an interaction's validation).
FAST_PATH_VALIDATORS: dict[EventKind, tuple[Callable[[bytes], Any], int]] = {
    EventKind.INTERACTION: (
        Interaction.__pydantic_validator__.validate_json,
        INTERACTION_SCHEMA_VERSION,
    ),
    EventKind.FEEDBACK: (
        Feedback.__pydantic_validator__.validate_json,
        FEEDBACK_SCHEMA_VERSION,
    ),
}


class RejectReason(StrEnum):
    """Why a record was dead-lettered (the `reason` label of the metric)."""

    OVERSIZED_PAYLOAD = "oversized_payload"
    EMPTY_PAYLOAD = "empty_payload"
    INVALID_UTF8 = "invalid_utf8"
    INVALID_JSON = "invalid_json"
    NOT_AN_OBJECT = "not_an_object"
    UNSUPPORTED_SCHEMA_VERSION = "unsupported_schema_version"
    NUL_CHARACTER = "nul_character"
    VALIDATION_ERROR = "validation_error"
    VALUE_OUT_OF_RANGE = "value_out_of_range"
    STORAGE_REJECTED = "storage_rejected"
    DUPLICATE = "duplicate"


@dataclass(frozen=True)
class Rejection:
    """A record that cannot be stored: the reason and a human-readable detail."""

    reason: RejectReason
    detail: str


Event = Interaction | Feedback


def parse_record(
    kind: EventKind, value: bytes | None, *, max_payload_bytes: int
) -> Event | Rejection:
    """Validate one record's value as an event of `kind`, or say why it is refused."""
    if value is None or not value:
        return Rejection(RejectReason.EMPTY_PAYLOAD, "record has no value")
    if len(value) > max_payload_bytes:
        return Rejection(
            RejectReason.OVERSIZED_PAYLOAD,
            f"{len(value)} bytes, more than max_payload_bytes={max_payload_bytes}",
        )
    fast = _maybe_parse_fast(kind, value)
    if fast is not None:
        return fast

    # The full path, taken for anything the fast path did not accept, names the reason.
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as error:
        return Rejection(RejectReason.INVALID_UTF8, str(error))
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError as error:
        return Rejection(RejectReason.INVALID_JSON, _clip(str(error)))
    if not isinstance(data, dict):
        return Rejection(
            RejectReason.NOT_AN_OBJECT,
            f"expected a JSON object, got {_json_type(data)}",
        )
    return _parse_object(kind, data)


def record_row(
    kind: EventKind,
    value: bytes | None,
    *,
    max_payload_bytes: int,
    keyring: Keyring | None = None,
) -> tuple[Any, ...] | Rejection:
    """One record's row, or why it is refused: `parse_record`, then the row builder.

    The collector's per-record work in one call (it runs some 100,000 times a
    second): the common case is validated and turned into its row here.
    """
    event: Event | None = None
    if value and len(value) <= max_payload_bytes:
        event = _maybe_parse_fast(kind, value)
    if event is None:
        outcome = parse_record(kind, value, max_payload_bytes=max_payload_bytes)
        if isinstance(outcome, Rejection):
            return outcome
        event = outcome
    if isinstance(event, Interaction):
        return interaction_row(event, keyring)
    return feedback_row(event, keyring)


def _maybe_parse_fast(kind: EventKind, value: bytes) -> Event | None:
    """The common case in one pass over the bytes; None sends it down the full path.

    Accepts only what the full path would accept: JSON that validates, of a known
    version, with no escaped NUL anywhere (a raw NUL or invalid UTF-8 already fails
    the JSON parser), with token counts that fit PostgreSQL's integer.
    """
    # Each marker is looked for only when its rarest byte is there: a one-byte
    # search is several times faster than a search for the whole marker.
    if (
        (BACKSLASH in value and NUL_ESCAPE in value)
        or (CAPITAL_N in value and NAN in value)
        or (CAPITAL_I in value and INFINITY in value)
    ):
        return None
    validate, known_version = FAST_PATH_VALIDATORS[kind]
    try:
        event: Event = validate(value)
    except ValidationError:
        return None
    if event.schema_version > known_version:
        return None
    if type(event) is Interaction:
        usage = event.usage
        if max(usage.prompt_tokens, usage.completion_tokens) > MAX_INT4:
            return None
    return event


def _parse_object(kind: EventKind, data: dict[str, Any]) -> Event | Rejection:
    version = data.get("schema_version")
    known = KNOWN_SCHEMA_VERSIONS[kind]
    if isinstance(version, int) and not isinstance(version, bool) and version > known:
        return Rejection(
            RejectReason.UNSUPPORTED_SCHEMA_VERSION,
            f"{kind} schema_version {version}, this collector knows up to {known}",
        )
    nul_path = find_nul(data)
    if nul_path is not None:
        return Rejection(
            RejectReason.NUL_CHARACTER,
            f"NUL character (\\u0000) at {nul_path}; PostgreSQL text refuses it",
        )
    try:
        event: Event = (
            Interaction.model_validate(data)
            if kind is EventKind.INTERACTION
            else Feedback.model_validate(data)
        )
    except ValidationError as error:
        return Rejection(RejectReason.VALIDATION_ERROR, describe_validation(error))
    if isinstance(event, Interaction):
        usage = event.usage
        if max(usage.prompt_tokens, usage.completion_tokens) > MAX_INT4:
            return Rejection(
                RejectReason.VALUE_OUT_OF_RANGE,
                f"token counts must be at most {MAX_INT4}",
            )
    return event


def find_nul(value: Any, path: str = "$") -> str | None:
    """The JSON path of the first string (or key) holding a NUL character, if any."""
    if isinstance(value, str):
        return path if "\x00" in value else None
    if isinstance(value, dict):
        for key, item in value.items():
            if "\x00" in key:
                return f"{path} (a key)"
            found = find_nul(item, f"{path}.{key}")
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = find_nul(item, f"{path}[{index}]")
            if found is not None:
                return found
    return None


def describe_validation(error: ValidationError) -> str:
    """Where and why validation failed, never echoing the input (it may be private)."""
    parts = [
        f"{'.'.join(str(step) for step in item['loc']) or '$'}: {item['msg']}"
        for item in error.errors(include_url=False, include_input=False)
    ]
    return _clip("; ".join(parts))


def build_dead_letter(
    rejection: Rejection,
    *,
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    consumer: str,
    max_value_bytes: int = DEAD_LETTER_MAX_VALUE_BYTES,
) -> DeadLetter:
    """The dead-letter event for one refused record, with its original bytes.

    A value over `max_value_bytes` (a key over DEAD_LETTER_MAX_KEY_BYTES) is cut to
    its first bytes, and the detail says so.
    """
    value = value or b""
    detail = rejection.detail
    cuts = [
        f"original_{name}_b64 holds the first {limit:,} of its {len(data):,} bytes"
        for name, data, limit in (
            ("value", value, max_value_bytes),
            ("key", key or b"", DEAD_LETTER_MAX_KEY_BYTES),
        )
        if len(data) > limit
    ]
    if cuts:
        detail = f"{'; '.join(cuts)}. {detail}"
    return DeadLetter(
        event_id=uuid.uuid5(DEAD_LETTER_NAMESPACE, f"{topic}/{partition}/{offset}"),
        reason=rejection.reason.value,
        detail=_clip(detail),
        source_topic=topic,
        source_partition=partition,
        source_offset=offset,
        original_key_b64=(
            base64.b64encode(key[:DEAD_LETTER_MAX_KEY_BYTES]).decode()
            if key is not None
            else None
        ),
        original_value_b64=base64.b64encode(value[:max_value_bytes]).decode(),
        consumer=consumer,
    )


INTERACTION_COLUMNS = (
    "event_id",
    "interaction_id",
    "project_id",
    "session_id",
    "user_id",
    "route",
    "variant",
    "model_version",
    "upstream_model",
    "experiment_id",
    "arm",
    "request_messages",
    "request_params",
    "response_text",
    "finish_reason",
    "error",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
    "latency_s",
    "ttft_s",
    "stream",
    "metadata",
    "started_at",
    "finished_at",
    "content_key_id",
    "request_messages_sealed",
    "response_text_sealed",
)

FEEDBACK_COLUMNS = (
    "event_id",
    "interaction_id",
    "project_id",
    "kind",
    "value",
    "text",
    "user_id",
    "created_at",
    "content_key_id",
    "text_sealed",
)


def interaction_row(
    event: Interaction, keyring: Keyring | None = None
) -> tuple[Any, ...]:
    """The `interactions` row of an event, in INTERACTION_COLUMNS order.

    jsonb columns are JSON text: a list passed in an array parameter would read as
    one more array dimension. With an active key in `keyring` the content columns
    are NULL and their sealed columns hold the ciphertext.
    """
    if keyring is None or keyring.active_key_id is None:
        key_id = None
        messages_plain: str | None = messages_json(event.request_messages)
        response_plain = event.response_text
        sealed: list[bytes | None] = [None, None]
    else:
        messages = [
            message.model_dump(mode="json") for message in event.request_messages
        ]
        key_id, (messages_plain, response_plain), sealed = seal_values(
            keyring, "interactions", event.event_id, (messages, event.response_text)
        )
        messages_plain = None if messages_plain is None else to_json(messages_plain)
    return (
        event.event_id,
        event.interaction_id,
        event.project_id,
        event.session_id,
        event.user_id,
        event.route,
        event.variant,
        event.model_version,
        event.upstream_model,
        event.experiment_id,
        event.arm,
        messages_plain,
        to_json(event.request_params),
        response_plain,
        event.finish_reason,
        to_json(event.error.model_dump(mode="json")) if event.error else None,
        event.usage.prompt_tokens,
        event.usage.completion_tokens,
        event.cost_usd,
        event.latency_s,
        event.time_to_first_token_s,
        event.stream,
        to_json(event.metadata),
        as_utc(event.started_at),
        as_utc(event.finished_at),
        key_id,
        *sealed,
    )


def feedback_row(event: Feedback, keyring: Keyring | None = None) -> tuple[Any, ...]:
    """The `feedback` row of an event, in FEEDBACK_COLUMNS order (sealed as above)."""
    if keyring is None or keyring.active_key_id is None:
        key_id, text, sealed_text = None, event.text, None
    else:
        key_id, (text,), (sealed_text,) = seal_values(
            keyring, "feedback", event.event_id, (event.text,)
        )
    return (
        event.event_id,
        event.interaction_id,
        event.project_id,
        event.kind.value,
        event.value,
        text,
        event.user_id,
        as_utc(event.created_at),
        key_id,
        sealed_text,
    )


def as_utc(moment: datetime) -> datetime:
    """A timezone-aware datetime; a naive one is taken to be UTC already."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment


def to_json(value: Any) -> str:
    """A jsonb column's value (parsed from JSON, so JSON's types only) as JSON text."""
    if not value and isinstance(value, dict):
        return "{}"
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:
        # An integer beyond 64 bits: valid JSON, which jsonb keeps exactly.
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def messages_json(messages: list[ChatMessage]) -> str:
    """The request messages as JSON text: each one's fields, then its extra fields.

    What `MESSAGES.dump_json` writes, in half the time; a message orjson cannot
    write (an integer beyond 64 bits) takes that slower path.
    """
    try:
        return orjson.dumps(
            [
                {**message.__dict__, **message.__pydantic_extra__}
                if message.__pydantic_extra__
                else message.__dict__
                for message in messages
            ]
        ).decode()
    except orjson.JSONEncodeError:
        return MESSAGES.dump_json(messages).decode()


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    return "a number"


def _clip(text: str) -> str:
    if len(text) <= MAX_DETAIL_CHARS:
        return text
    return text[: MAX_DETAIL_CHARS - 1] + "…"
