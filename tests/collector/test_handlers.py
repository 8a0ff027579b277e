"""Pure validation rules: each bad input kind gets its reason, good events parse."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from services.collector.handlers import (
    FEEDBACK_COLUMNS,
    INTERACTION_COLUMNS,
    MAX_INT4,
    MESSAGES,
    EventKind,
    Rejection,
    RejectReason,
    as_utc,
    build_dead_letter,
    feedback_row,
    interaction_row,
    messages_json,
    parse_record,
    record_row,
)
from services.common.events import Feedback, Interaction, encode

MAX_BYTES = 64 * 1024
MOMENT = "2025-01-01T00:00:02Z"


def interaction_data(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "schema_version": 1,
        "event_id": str(uuid.uuid4()),
        "interaction_id": str(uuid.uuid4()),
        "project_id": "demo",
        "route": "support-bot",
        "variant": "baseline",
        "request_messages": [{"role": "user", "content": "What is the capital?"}],
        "response_text": "Paris.",
        "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9},
        "latency_s": 0.4,
        "started_at": "2025-01-01T00:00:00Z",
        "finished_at": "2025-01-01T00:00:01Z",
    }
    data.update(changes)
    return data


def feedback_data(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "event_id": str(uuid.uuid4()),
        "interaction_id": str(uuid.uuid4()),
        "project_id": "demo",
        "kind": "thumbs",
        "value": 1,
    }
    data.update(changes)
    return data


def parse(kind: EventKind, value: bytes | None) -> Interaction | Feedback | Rejection:
    return parse_record(kind, value, max_payload_bytes=MAX_BYTES)


def as_bytes(data: Any) -> bytes:
    return json.dumps(data).encode()


def test_parse_record_valid_interaction_returns_event() -> None:
    data = interaction_data()

    event = parse(EventKind.INTERACTION, as_bytes(data))

    assert isinstance(event, Interaction)
    assert str(event.event_id) == data["event_id"]
    assert event.usage.completion_tokens == 2


def test_parse_record_valid_feedback_returns_event() -> None:
    data = feedback_data(kind="score", value=0.75, text="close enough")

    event = parse(EventKind.FEEDBACK, as_bytes(data))

    assert isinstance(event, Feedback)
    assert event.value == 0.75


def test_parse_record_encoded_event_round_trips() -> None:
    original = Feedback(
        interaction_id=uuid.uuid4(), project_id="p", kind="copy", value=1
    )

    event = parse(EventKind.FEEDBACK, encode(original))

    assert event == original


@pytest.mark.parametrize(
    ("kind", "value", "reason"),
    [
        (EventKind.FEEDBACK, None, RejectReason.EMPTY_PAYLOAD),
        (EventKind.FEEDBACK, b"", RejectReason.EMPTY_PAYLOAD),
        (EventKind.FEEDBACK, b"\xff\xfe{}", RejectReason.INVALID_UTF8),
        (EventKind.FEEDBACK, b'{"kind": "thumbs",', RejectReason.INVALID_JSON),
        (EventKind.FEEDBACK, b'{"text": "\\ud800"}', RejectReason.INVALID_JSON),
        (EventKind.FEEDBACK, b"NaN", RejectReason.INVALID_JSON),
        (EventKind.FEEDBACK, b"[1, 2]", RejectReason.NOT_AN_OBJECT),
        (EventKind.FEEDBACK, b'"thumbs"', RejectReason.NOT_AN_OBJECT),
        (EventKind.FEEDBACK, b"null", RejectReason.NOT_AN_OBJECT),
        (EventKind.FEEDBACK, b"x" * (MAX_BYTES + 1), RejectReason.OVERSIZED_PAYLOAD),
    ],
)
def test_parse_record_malformed_bytes_are_rejected_with_reason(
    kind: EventKind, value: bytes | None, reason: RejectReason
) -> None:
    outcome = parse(kind, value)

    assert isinstance(outcome, Rejection)
    assert outcome.reason is reason
    assert outcome.detail


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (feedback_data(kind="telepathy"), "kind"),
        (feedback_data(value=3), "value"),
        (feedback_data(interaction_id="not-a-uuid"), "interaction_id"),
        ({k: v for k, v in feedback_data().items() if k != "project_id"}, "project_id"),
    ],
)
def test_parse_record_invalid_feedback_fields_name_the_field(
    data: dict[str, Any], field: str
) -> None:
    outcome = parse(EventKind.FEEDBACK, as_bytes(data))

    assert isinstance(outcome, Rejection)
    assert outcome.reason is RejectReason.VALIDATION_ERROR
    assert field in outcome.detail


def test_parse_record_validation_detail_never_echoes_input() -> None:
    data = feedback_data(interaction_id="secret-user-text")

    outcome = parse(EventKind.FEEDBACK, as_bytes(data))

    assert isinstance(outcome, Rejection)
    assert "secret-user-text" not in outcome.detail


def test_parse_record_interaction_missing_latency_is_validation_error() -> None:
    data = interaction_data()
    del data["latency_s"]

    outcome = parse(EventKind.INTERACTION, as_bytes(data))

    assert isinstance(outcome, Rejection)
    assert outcome.reason is RejectReason.VALIDATION_ERROR
    assert "latency_s" in outcome.detail


def test_parse_record_unknown_role_is_validation_error() -> None:
    data = interaction_data(request_messages=[{"role": "wizard", "content": "hi"}])

    outcome = parse(EventKind.INTERACTION, as_bytes(data))

    assert isinstance(outcome, Rejection)
    assert outcome.reason is RejectReason.VALIDATION_ERROR


@pytest.mark.parametrize(
    ("kind", "data"),
    [
        (EventKind.INTERACTION, interaction_data(schema_version=2)),
        (EventKind.FEEDBACK, feedback_data(schema_version=99, kind="new-kind")),
    ],
)
def test_parse_record_newer_schema_version_is_unsupported(
    kind: EventKind, data: dict[str, Any]
) -> None:
    outcome = parse(kind, as_bytes(data))

    assert isinstance(outcome, Rejection)
    assert outcome.reason is RejectReason.UNSUPPORTED_SCHEMA_VERSION


@pytest.mark.parametrize(
    "data",
    [
        feedback_data(kind="comment", value=None, text="bad\u0000text"),
        feedback_data(extra={"nested": ["ok", "nul\u0000"]}),
        feedback_data(extra={"key\u0000": 1}),
    ],
)
def test_parse_record_nul_character_is_rejected(data: dict[str, Any]) -> None:
    outcome = parse(EventKind.FEEDBACK, as_bytes(data))

    assert isinstance(outcome, Rejection)
    assert outcome.reason is RejectReason.NUL_CHARACTER


def test_parse_record_tokens_beyond_int4_are_out_of_range() -> None:
    data = interaction_data(usage={"prompt_tokens": MAX_INT4 + 1})

    outcome = parse(EventKind.INTERACTION, as_bytes(data))

    assert isinstance(outcome, Rejection)
    assert outcome.reason is RejectReason.VALUE_OUT_OF_RANGE


def test_build_dead_letter_keeps_source_and_bytes_with_stable_id() -> None:
    rejection = Rejection(RejectReason.INVALID_JSON, "unexpected end")
    place = {"topic": "t.feedback.v1", "partition": 2, "offset": 41}

    letter = build_dead_letter(
        rejection, **place, key=b"k1", value=b"{oops", consumer="collector"
    )
    again = build_dead_letter(
        rejection, **place, key=b"k1", value=b"{oops", consumer="collector"
    )

    assert letter.reason == "invalid_json"
    assert (letter.source_topic, letter.source_partition, letter.source_offset) == (
        "t.feedback.v1",
        2,
        41,
    )
    assert base64.b64decode(letter.original_value_b64) == b"{oops"
    assert letter.original_key_b64 is not None
    assert base64.b64decode(letter.original_key_b64) == b"k1"
    assert letter.event_id == again.event_id


def test_dead_letter_of_a_large_record_fits_one_kafka_message() -> None:
    """A letter over the broker's message limit would hold up every record after it."""
    value = b"{" + b"x" * (1024 * 1024)
    key = b"k" * 100_000

    letter = build_dead_letter(
        Rejection(RejectReason.OVERSIZED_PAYLOAD, "too large"),
        topic="t.interactions.v1",
        partition=0,
        offset=7,
        key=key,
        value=value,
        consumer="collector",
    )

    assert len(encode(letter)) < 1_000_000
    assert base64.b64decode(letter.original_value_b64) == value[: 512 * 1024]
    assert letter.original_key_b64 is not None
    assert base64.b64decode(letter.original_key_b64) == key[: 16 * 1024]
    assert letter.detail.startswith(
        "original_value_b64 holds the first 524,288 of its 1,048,577 bytes;"
        " original_key_b64 holds the first 16,384 of its 100,000 bytes. too large"
    )


def test_rows_follow_column_order_and_encode_jsonb_as_text() -> None:
    interaction = Interaction.model_validate(interaction_data(metadata={"a": "b"}))
    feedback = Feedback.model_validate(feedback_data())

    row = dict(zip(INTERACTION_COLUMNS, interaction_row(interaction), strict=True))
    frow = dict(zip(FEEDBACK_COLUMNS, feedback_row(feedback), strict=True))

    assert json.loads(row["request_messages"])[0]["role"] == "user"
    assert json.loads(row["metadata"]) == {"a": "b"}
    assert row["prompt_tokens"] == 7
    assert frow["kind"] == "thumbs"
    assert frow["created_at"].tzinfo is not None


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "What is the capital?"}],
        [
            {"role": "system", "content": None, "name": "setup"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "é ✓"}, {"type": "x", "n": 1.5}],
                "cache": {"ttl": 3},
            },
            {"role": "tool", "content": "42", "tool_call_id": "call-1"},
        ],
        [{"role": "user", "content": [{"n": 10**30}]}],
    ],
    ids=["plain", "parts-and-extra-fields", "integer-beyond-64-bits"],
)
def test_messages_json_writes_what_pydantic_writes(
    messages: list[dict[str, Any]],
) -> None:
    event = Interaction.model_validate(interaction_data(request_messages=messages))

    written = messages_json(event.request_messages)

    assert written == MESSAGES.dump_json(event.request_messages).decode()
    assert json.loads(written) == MESSAGES.dump_python(
        event.request_messages, mode="json"
    )


def test_rows_keep_integers_beyond_64_bits_exactly() -> None:
    """Valid JSON that orjson cannot write: the row must not fail (a poison pill)."""
    raw = json.dumps(
        interaction_data(
            request_params={"seed": 10**30},
            error={"type": "upstream", "message": "x", "status_code": 10**20},
        )
    ).encode()
    event = parse_record(EventKind.INTERACTION, raw, max_payload_bytes=MAX_BYTES)
    assert isinstance(event, Interaction)

    row = dict(zip(INTERACTION_COLUMNS, interaction_row(event), strict=True))

    assert json.loads(row["request_params"]) == {"seed": 10**30}
    assert json.loads(row["error"])["status_code"] == 10**20


def test_as_utc_naive_datetime_is_taken_as_utc() -> None:
    naive = datetime(2025, 1, 1, 12, 0)

    assert as_utc(naive) == datetime(2025, 1, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    "literal", [b"NaN", b"Infinity", b"-Infinity"], ids=["nan", "inf", "-inf"]
)
def test_parse_record_non_finite_literal_is_invalid_json(literal: bytes) -> None:
    value = as_bytes(feedback_data(extra=["PLACEHOLDER"]))
    value = value.replace(b'"PLACEHOLDER"', literal)

    outcome = parse(EventKind.FEEDBACK, value)

    assert isinstance(outcome, Rejection)
    assert outcome.reason is RejectReason.INVALID_JSON


def test_parse_record_escaped_backslash_before_u0000_is_not_a_nul() -> None:
    data = feedback_data(kind="comment", value=None, text="C:\\u0000 NaN")

    event = parse(EventKind.FEEDBACK, as_bytes(data))

    assert isinstance(event, Feedback)
    assert event.text == "C:\\u0000 NaN"


@pytest.mark.parametrize(
    ("kind", "value"),
    [
        (EventKind.INTERACTION, json.dumps(interaction_data()).encode()),
        (EventKind.FEEDBACK, json.dumps(feedback_data(created_at=MOMENT)).encode()),
        # The full path: a false alarm for the NaN marker, then a good event.
        (
            EventKind.FEEDBACK,
            json.dumps(feedback_data(text="NaN days", created_at=MOMENT)).encode(),
        ),
        (EventKind.FEEDBACK, json.dumps(feedback_data(kind="stars")).encode()),
        (EventKind.INTERACTION, b"x" * (MAX_BYTES + 1)),
        (EventKind.INTERACTION, None),
    ],
    ids=["interaction", "feedback", "full-path", "invalid", "oversized", "empty"],
)
def test_record_row_is_parse_record_then_the_row_builder(
    kind: EventKind, value: bytes | None
) -> None:
    parsed = parse_record(kind, value, max_payload_bytes=MAX_BYTES)
    if isinstance(parsed, Interaction):
        expected: object = interaction_row(parsed)
    elif isinstance(parsed, Feedback):
        expected = feedback_row(parsed)
    else:
        expected = parsed

    assert record_row(kind, value, max_payload_bytes=MAX_BYTES) == expected


@pytest.mark.parametrize("field", ["cost_usd", "latency_s", "time_to_first_token_s"])
def test_parse_record_number_beyond_a_double_is_refused(field: str) -> None:
    """1e400 parses as infinity: stored, it would poison every sum of its column."""
    raw = json.dumps(interaction_data(**{field: 1.0})).encode()
    raw = raw.replace(f'"{field}": 1.0'.encode(), f'"{field}": 1e400'.encode())

    outcome = parse_record(EventKind.INTERACTION, raw, max_payload_bytes=MAX_BYTES)

    assert isinstance(outcome, Rejection)
    assert outcome.reason is RejectReason.INVALID_JSON


def test_dead_letter_keeps_a_large_value_whole_when_its_limit_allows() -> None:
    value = b"x" * 600_000

    letter = build_dead_letter(
        Rejection(RejectReason.INVALID_JSON, "bad"),
        topic="t",
        partition=0,
        offset=1,
        key=None,
        value=value,
        consumer="collector",
        max_value_bytes=1024 * 1024,
    )

    assert base64.b64decode(letter.original_value_b64) == value
    assert letter.detail == "bad"
