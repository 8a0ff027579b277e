"""Sealing message content: round trips, bound associated data, key errors, config."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import ValidationError

from services.collector.handlers import (
    FEEDBACK_COLUMNS,
    INTERACTION_COLUMNS,
    feedback_row,
    interaction_row,
)
from services.collector.settings import CollectorSettings
from services.common.events import Feedback, Interaction
from services.common.sealing import (
    CONTENT_COLUMNS,
    KeyConfigError,
    Keyring,
    OpenFailedError,
    UnknownKeyError,
    open_content,
    parse_keys,
    seal_values,
)
from services.common.settings import EncryptionSettings

KEY_A = bytes(range(32))
KEY_B = bytes(range(32, 64))
MESSAGES = [{"role": "user", "content": "my card is 4111 and I live on Elm St"}]
ANSWER = "Noted, Elm St."


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def keyring_a() -> Keyring:
    return Keyring({"ka": KEY_A}, "ka")


def stored_row(table: str, event_id: uuid.UUID, keyring: Keyring, values: list):
    """A row as `content_select` would return it after `seal_values` stored it."""
    key_id, plain, sealed = seal_values(keyring, table, event_id, values)
    row = {"event_id": event_id, "content_key_id": key_id}
    for column, plain_value, sealed_value in zip(
        CONTENT_COLUMNS[table], plain, sealed, strict=True
    ):
        row[column.name] = plain_value
        row[column.sealed_name] = sealed_value
    return row


def test_seal_values_then_open_content_round_trips_both_tables() -> None:
    keyring = keyring_a()
    interaction_id, feedback_id = uuid.uuid4(), uuid.uuid4()

    row = stored_row("interactions", interaction_id, keyring, [MESSAGES, ANSWER])
    frow = stored_row("feedback", feedback_id, keyring, ["Paris, not Lyon."])

    assert row["content_key_id"] == "ka"
    assert row["request_messages"] is None and row["response_text"] is None
    assert b"Elm" not in row["request_messages_sealed"]
    assert open_content(keyring, "interactions", row) == {
        "request_messages": MESSAGES,
        "response_text": ANSWER,
    }
    assert open_content(keyring, "feedback", frow) == {"text": "Paris, not Lyon."}


def test_seal_values_keeps_null_content_null_and_nonces_fresh() -> None:
    keyring = keyring_a()
    event_id = uuid.uuid4()

    _, _, first = seal_values(keyring, "interactions", event_id, [MESSAGES, None])
    _, _, second = seal_values(keyring, "interactions", event_id, [MESSAGES, None])

    assert first[1] is None
    assert first[0] != second[0]
    assert first[0] is not None and second[0] is not None
    assert first[0][:12] != second[0][:12]


def test_no_active_key_stores_plaintext_and_opens_it_unchanged() -> None:
    event_id = uuid.uuid4()

    row = stored_row("interactions", event_id, Keyring.empty(), [MESSAGES, ANSWER])

    assert row["content_key_id"] is None
    assert row["request_messages_sealed"] is None
    assert open_content(Keyring.empty(), "interactions", row)["response_text"] == (
        ANSWER
    )


def test_open_content_with_another_rows_id_fails() -> None:
    keyring = keyring_a()
    row = stored_row("feedback", uuid.uuid4(), keyring, ["secret"])

    with pytest.raises(OpenFailedError, match="ka"):
        open_content(keyring, "feedback", {**row, "event_id": uuid.uuid4()})


def test_open_content_with_value_moved_to_another_column_fails() -> None:
    keyring = keyring_a()
    row = stored_row("interactions", uuid.uuid4(), keyring, [MESSAGES, ANSWER])
    moved = {**row, "response_text_sealed": row["request_messages_sealed"]}

    with pytest.raises(OpenFailedError):
        open_content(keyring, "interactions", moved)


def test_open_under_a_different_key_with_the_same_id_fails() -> None:
    row = stored_row("feedback", uuid.uuid4(), keyring_a(), ["secret"])

    with pytest.raises(OpenFailedError):
        open_content(Keyring({"ka": KEY_B}, "ka"), "feedback", row)


def test_open_content_with_unknown_key_id_names_it() -> None:
    row = stored_row("feedback", uuid.uuid4(), keyring_a(), ["secret"])

    with pytest.raises(UnknownKeyError, match="'ka'") as caught:
        open_content(Keyring({"kb": KEY_B}, "kb"), "feedback", row)
    assert caught.value.key_id == "ka"
    with pytest.raises(UnknownKeyError, match="'ka'"):
        open_content(Keyring.empty(), "feedback", row)


def test_parse_keys_reads_commas_and_lines() -> None:
    text = f"ka:{b64(KEY_A)},\n# old key\nkb : {b64(KEY_B)}\n"

    assert parse_keys(text) == {"ka": KEY_A, "kb": KEY_B}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ka", "not `id:base64-key`"),
        (f"bad id:{b64(KEY_A)}", "not `id:base64-key`"),
        ("ka:!!!notbase64", "not valid base64"),
        (f"ka:{b64(KEY_A[:16])}", "16 bytes"),
        (f"ka:{b64(KEY_A)},ka:{b64(KEY_B)}", "given twice"),
    ],
    ids=["no-separator", "bad-id", "not-base64", "short-key", "duplicate"],
)
def test_parse_keys_malformed_names_the_setting(text: str, message: str) -> None:
    with pytest.raises(KeyConfigError, match=message) as caught:
        parse_keys(text)
    assert "FLYWHEEL_ENCRYPTION__KEYS" in str(caught.value)


def test_keyring_active_key_must_be_configured() -> None:
    with pytest.raises(KeyConfigError, match="FLYWHEEL_ENCRYPTION__ACTIVE_KEY"):
        Keyring({"ka": KEY_A}, "kb")
    with pytest.raises(KeyConfigError, match="FLYWHEEL_ENCRYPTION__ACTIVE_KEY"):
        Keyring({"ka": KEY_A}, None)


def test_encryption_settings_reads_keys_and_a_keys_file(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"kb:{b64(KEY_B)}\n")

    settings = EncryptionSettings(
        keys=f"ka:{b64(KEY_A)}", keys_file=str(keys_file), active_key="kb"
    )

    assert settings.keyring.key_ids == ["ka", "kb"]
    assert settings.keyring.active_key_id == "kb"
    assert b64(KEY_A) not in repr(settings.model_dump(mode="json"))
    assert EncryptionSettings().keyring.active_key_id is None


def test_encryption_settings_missing_keys_file_names_the_setting() -> None:
    with pytest.raises(ValidationError, match="FLYWHEEL_ENCRYPTION__KEYS_FILE"):
        EncryptionSettings(keys_file="/nonexistent/flywheel-keys", active_key="ka")


def test_collector_settings_malformed_shared_key_fails_at_load(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FLYWHEEL_ENCRYPTION__KEYS", "ka:short")
    monkeypatch.setenv("FLYWHEEL_ENCRYPTION__ACTIVE_KEY", "ka")

    with pytest.raises(ValidationError, match="FLYWHEEL_ENCRYPTION__KEYS"):
        CollectorSettings.load()


def test_collector_settings_load_shared_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLYWHEEL_ENCRYPTION__KEYS", f"ka:{b64(KEY_A)}")
    monkeypatch.setenv("FLYWHEEL_ENCRYPTION__ACTIVE_KEY", "ka")

    settings = CollectorSettings.load()

    assert settings.encryption.keyring.active_key_id == "ka"


def test_collector_rows_with_a_key_hold_no_plaintext_content() -> None:
    now = datetime.now(UTC)
    interaction = Interaction(
        project_id="p",
        route="r",
        variant="v",
        request_messages=MESSAGES,
        response_text=ANSWER,
        latency_s=0.1,
        started_at=now,
        finished_at=now,
    )
    feedback = Feedback(
        interaction_id=interaction.interaction_id,
        project_id="p",
        kind="correction",
        text="Elm Street, 12",
    )
    keyring = keyring_a()
    messages = [
        message.model_dump(mode="json") for message in interaction.request_messages
    ]

    row = dict(
        zip(INTERACTION_COLUMNS, interaction_row(interaction, keyring), strict=True)
    )
    frow = dict(zip(FEEDBACK_COLUMNS, feedback_row(feedback, keyring), strict=True))
    plain = dict(zip(INTERACTION_COLUMNS, interaction_row(interaction), strict=True))

    assert "Elm" not in repr(row) and "Elm" not in repr(frow)
    assert row["content_key_id"] == frow["content_key_id"] == "ka"
    assert open_content(keyring, "interactions", row)["request_messages"] == messages
    assert open_content(keyring, "feedback", frow)["text"] == "Elm Street, 12"
    assert plain["content_key_id"] is None
    assert json.loads(plain["request_messages"]) == messages
