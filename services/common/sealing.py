"""Encryption at rest for message content: AES-256-GCM with a key id on every row.

The content columns (an interaction's request messages and response text, a feedback
event's free text) are sealed when a key is active: each value gets a fresh random
96-bit nonce and is stored as nonce || ciphertext+tag in a `<column>_sealed` bytea
column, with the plaintext column left NULL. The row's `content_key_id` names the
key; NULL means the row is plaintext (no key was configured when it was written).
The associated data binds a ciphertext to its table, column and event_id, so it
cannot be moved to another row or column and still open.

This module does no I/O: the collector seals rows on write (`seal_values`), every
reader opens them with `open_content`, and `services/common/key_rotation.py`
re-seals stored rows to the active key.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NONCE_BYTES = 12
KEY_BYTES = 32
KEY_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# The environment variables a reader of an error message has to change.
KEYS_SETTING = "FLYWHEEL_ENCRYPTION__KEYS"
KEYS_FILE_SETTING = "FLYWHEEL_ENCRYPTION__KEYS_FILE"
ACTIVE_KEY_SETTING = "FLYWHEEL_ENCRYPTION__ACTIVE_KEY"


class SealingError(Exception):
    """Base of the errors of sealed content."""


class KeyConfigError(SealingError, ValueError):
    """The key configuration cannot be used; the message names the setting.

    A ValueError too, so a pydantic validator reports it as a validation error.
    """


class UnknownKeyError(SealingError):
    """A row was sealed under a key id that is not configured here."""

    def __init__(self, key_id: str) -> None:
        super().__init__(
            f"content sealed under key id {key_id!r}, which is not configured: add"
            f" it to {KEYS_SETTING} (or {KEYS_FILE_SETTING}), or rotate the rows"
            " to another key while it still is"
        )
        self.key_id = key_id


class OpenFailedError(SealingError):
    """A sealed value did not authenticate: another key, row or column, or altered."""


def parse_keys(text: str, *, setting: str = KEYS_SETTING) -> dict[str, bytes]:
    """Keys from `id:base64` entries separated by commas or new lines.

    Each key is 32 random bytes in standard base64 (e.g. `openssl rand -base64 32`).
    Blank entries and lines starting with `#` are skipped.
    """
    keys: dict[str, bytes] = {}
    entries = [entry.strip() for entry in re.split(r"[,\n]", text)]
    for number, entry in enumerate(entries, 1):
        if not entry or entry.startswith("#"):
            continue
        key_id, separator, encoded = entry.partition(":")
        key_id = key_id.strip()
        if not separator or not KEY_ID_PATTERN.match(key_id):
            raise KeyConfigError(
                f"{setting}: entry {number} is not `id:base64-key` with an id of"
                " letters, digits, '_', '.' or '-' (at most 64)"
            )
        try:
            key = base64.b64decode(encoded.strip(), validate=True)
        except binascii.Error:
            raise KeyConfigError(
                f"{setting}: key {key_id!r} is not valid base64"
            ) from None
        if len(key) != KEY_BYTES:
            raise KeyConfigError(
                f"{setting}: key {key_id!r} is {len(key)} bytes, AES-256 needs"
                f" {KEY_BYTES} (base64 of 32 random bytes)"
            )
        if key_id in keys:
            raise KeyConfigError(f"{setting}: key id {key_id!r} is given twice")
        keys[key_id] = key
    return keys


class Keyring:
    """The configured keys, one AESGCM object each, and the key new content uses.

    No active key means content is written in plaintext (and sealed rows can still be
    opened with the keys given).
    """

    def __init__(self, keys: Mapping[str, bytes], active_key_id: str | None) -> None:
        if active_key_id is not None and active_key_id not in keys:
            raise KeyConfigError(
                f"{ACTIVE_KEY_SETTING}={active_key_id!r} names no key of"
                f" {KEYS_SETTING} / {KEYS_FILE_SETTING}"
                f" (configured: {sorted(keys) or 'none'})"
            )
        if keys and active_key_id is None:
            raise KeyConfigError(
                f"{KEYS_SETTING} is set but {ACTIVE_KEY_SETTING} is not: name the key"
                f" new content is sealed with (one of {sorted(keys)})"
            )
        self._ciphers = {key_id: AESGCM(key) for key_id, key in keys.items()}
        self._active_key_id = active_key_id

    @classmethod
    def empty(cls) -> Keyring:
        """No keys: content is written in plaintext, sealed rows cannot be opened."""
        return cls({}, None)

    @property
    def active_key_id(self) -> str | None:
        return self._active_key_id

    @property
    def key_ids(self) -> list[str]:
        return sorted(self._ciphers)

    def seal(self, plaintext: bytes, associated_data: bytes) -> bytes:
        """nonce || ciphertext+tag under the active key."""
        if self._active_key_id is None:
            raise KeyConfigError(f"no active key: set {ACTIVE_KEY_SETTING}")
        nonce = os.urandom(NONCE_BYTES)
        cipher = self._ciphers[self._active_key_id]
        return nonce + cipher.encrypt(nonce, plaintext, associated_data)

    def open(self, key_id: str, sealed: bytes, associated_data: bytes) -> bytes:
        """The plaintext of a value sealed under `key_id`."""
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            raise UnknownKeyError(key_id)
        if len(sealed) < NONCE_BYTES:
            raise OpenFailedError(f"sealed value of {len(sealed)} bytes is too short")
        try:
            return cipher.decrypt(
                sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], associated_data
            )
        except InvalidTag:
            raise OpenFailedError(
                f"a value sealed under key id {key_id!r} did not authenticate: the"
                " key's bytes changed, or the value was altered or moved to another"
                " row or column"
            ) from None


@dataclass(frozen=True)
class ContentColumn:
    """A column holding message content; its ciphertext lives in `<name>_sealed`."""

    table: str
    name: str
    is_json: bool = False

    @property
    def sealed_name(self) -> str:
        return f"{self.name}_sealed"

    @property
    def sql_type(self) -> str:
        return "jsonb" if self.is_json else "text"

    def associated_data(self, event_id: uuid.UUID | str) -> bytes:
        # The canonical UUID spelling, whatever form the caller holds.
        return f"flywheel/{self.table}.{self.name}/{uuid.UUID(str(event_id))}".encode()

    def encode(self, value: Any) -> bytes:
        if self.is_json:
            return orjson.dumps(value)
        return str(value).encode()

    def decode(self, plaintext: bytes) -> Any:
        if self.is_json:
            return orjson.loads(plaintext)
        return plaintext.decode()


# Every table with content, keyed by its rows' event_id. Other columns (metadata,
# request_params, error) are not sealed: they carry no message text by contract.
CONTENT_COLUMNS: dict[str, tuple[ContentColumn, ...]] = {
    "interactions": (
        ContentColumn("interactions", "request_messages", is_json=True),
        ContentColumn("interactions", "response_text"),
    ),
    "feedback": (ContentColumn("feedback", "text"),),
}


def seal_values(
    keyring: Keyring, table: str, event_id: uuid.UUID, values: Sequence[Any]
) -> tuple[str | None, list[Any], list[bytes | None]]:
    """A row's content as stored: (key id, plaintext columns, sealed columns).

    `values` are the content columns' values in CONTENT_COLUMNS order, as Python
    values. With no active key they come back unchanged beside NULL sealed columns;
    with one, the plaintext columns are NULL and each non-NULL value is sealed.
    """
    columns = CONTENT_COLUMNS[table]
    key_id = keyring.active_key_id
    if key_id is None:
        return None, list(values), [None] * len(columns)
    sealed = [
        None
        if value is None
        else keyring.seal(column.encode(value), column.associated_data(event_id))
        for column, value in zip(columns, values, strict=True)
    ]
    return key_id, [None] * len(columns), sealed


def open_content(
    keyring: Keyring, table: str, row: Mapping[str, Any], *, prefix: str = ""
) -> dict[str, Any]:
    """The content columns of a stored row, opened: {column name: value}.

    `row` holds the columns that `content_select(table, alias, prefix)` selects.
    Plaintext rows (no key id) come back as stored; a sealed row under a key that
    is not configured raises UnknownKeyError, never an empty value.
    """
    key_id = row[f"{prefix}content_key_id"]
    columns = CONTENT_COLUMNS[table]
    if key_id is None:
        return {column.name: row[f"{prefix}{column.name}"] for column in columns}
    event_id = row[f"{prefix}event_id"]
    opened: dict[str, Any] = {}
    for column in columns:
        sealed = row[f"{prefix}{column.sealed_name}"]
        opened[column.name] = (
            None
            if sealed is None
            else column.decode(
                keyring.open(key_id, bytes(sealed), column.associated_data(event_id))
            )
        )
    return opened


def content_select(table: str, alias: str, prefix: str = "") -> str:
    """The select-list part `open_content` needs, from `alias` (a row of `table`)."""
    names = ["event_id", "content_key_id"]
    for column in CONTENT_COLUMNS[table]:
        names += [column.name, column.sealed_name]
    return ", ".join(f"{alias}.{name} AS {prefix}{name}" for name in names)


def content_nulls(table: str, prefix: str = "") -> str:
    """Typed NULLs in `content_select`'s shape, for a UNION branch without the row."""
    parts = [f"NULL::uuid AS {prefix}event_id", f"NULL::text AS {prefix}content_key_id"]
    for column in CONTENT_COLUMNS[table]:
        parts += [
            f"NULL::{column.sql_type} AS {prefix}{column.name}",
            f"NULL::bytea AS {prefix}{column.sealed_name}",
        ]
    return ", ".join(parts)
