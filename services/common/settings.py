"""Settings groups shared by the services: Kafka, PostgreSQL, control, encryption, logs.

Each service composes these into its own `pydantic-settings` class with its own env
prefix (`FLYWHEEL_GATEWAY_`, ...). Nested groups read `__`-separated variables, e.g.
`FLYWHEEL_GATEWAY_KAFKA__BOOTSTRAP_SERVERS`. Shared values can also be given once
without the service prefix (`FLYWHEEL_KAFKA__BOOTSTRAP_SERVERS`), which is what
`flywheel up` does for the processes it starts.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    Field,
    PrivateAttr,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.sealing import (
    KEYS_FILE_SETTING,
    KeyConfigError,
    Keyring,
    parse_keys,
)


class KafkaSettings(BaseModel):
    """Where the broker is and how to name topics."""

    bootstrap_servers: str = "127.0.0.1:9092"
    topic_prefix: str = "flywheel."
    # Partitions declared for every topic Flywheel creates; collectors and analyzers
    # scale up to this many replicas.
    partitions: int = Field(default=4, ge=1)
    replication_factor: int = Field(default=1, ge=1)
    # Off against the embedded broker, which does not implement InitProducerId;
    # de-duplication by event_id gives exactly-once effects without it.
    enable_idempotence: bool = False
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = (
        "PLAINTEXT"
    )
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    # CA bundle (and optional client certificate) for SSL and SASL_SSL.
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    request_timeout_s: float = Field(default=30.0, gt=0)
    # Largest record batch a producer builds. NOTE: Tansu 0.6.0 (the embedded
    # broker) reports a partition's end offset as its last batch's first offset + 1,
    # so consumers do not see the tail of a multi-record batch until more arrives;
    # the embedded stack sets 1 (one record per batch). Real Kafka needs no change.
    producer_max_batch_bytes: int = Field(default=16_384, ge=1)
    # How long a consumer's fetch may wait for records (aiokafka's default is 500 ms).
    # The embedded broker holds a fetch that long even when records arrive meanwhile,
    # which delays every event by up to this much; with Kafka it only bounds how
    # often an idle consumer asks again.
    consumer_fetch_max_wait_ms: int = Field(default=100, ge=1, le=10_000)

    @field_validator("topic_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if value and not value.endswith("."):
            raise ValueError(f"topic_prefix must end with '.', got {value!r}")
        if value != value.lower():
            raise ValueError(f"topic_prefix must be lowercase, got {value!r}")
        return value

    @property
    def uses_tls(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for SSL and SASL_SSL (system CAs unless a CA file is set)."""
        if not self.uses_tls:
            return None
        from aiokafka.helpers import create_ssl_context

        context: ssl.SSLContext = create_ssl_context(
            cafile=self.ssl_cafile, certfile=self.ssl_certfile, keyfile=self.ssl_keyfile
        )
        return context

    def client_options(self) -> dict[str, Any]:
        """Connection options common to aiokafka producers, consumers and admins."""
        options: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "security_protocol": self.security_protocol,
            "request_timeout_ms": int(self.request_timeout_s * 1000),
        }
        if self.uses_tls:
            options["ssl_context"] = self.ssl_context()
        if self.sasl_mechanism:
            options["sasl_mechanism"] = self.sasl_mechanism
            options["sasl_plain_username"] = self.sasl_username
            options["sasl_plain_password"] = (
                self.sasl_password.get_secret_value() if self.sasl_password else None
            )
        return options


class PostgresSettings(BaseModel):
    """Where PostgreSQL is; `db_schema` isolates one deployment (or one test)."""

    dsn: SecretStr = SecretStr("postgresql://flywheel@127.0.0.1:5433/flywheel")
    db_schema: str = Field(default="flywheel", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    pool_min_size: int = Field(default=1, ge=0)
    pool_max_size: int = Field(default=5, ge=1)
    command_timeout_s: float = Field(default=30.0, gt=0)


class ControlPlaneSettings(BaseModel):
    """How to reach the trainer's gRPC control plane and authenticate to it."""

    address: str = "127.0.0.1:50051"
    token: SecretStr = SecretStr("flywheel-dev-token")
    tls: bool = False
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    reconnect_max_backoff_s: float = Field(default=10.0, gt=0)


class EncryptionSettings(BaseModel):
    """Keys that seal message content at rest (services/common/sealing.py).

    `keys` is `id:base64,id:base64` (each key 32 random bytes); `keys_file` names a
    file of such entries, one a line (a mounted Kubernetes Secret); both may be set.
    `active_key` seals new content. Nothing set: content is stored in plaintext.
    """

    keys: SecretStr | None = None
    keys_file: str | None = None
    active_key: str | None = None
    _keyring: Keyring = PrivateAttr(default_factory=Keyring.empty)

    @model_validator(mode="after")
    def _build_keyring(self) -> EncryptionSettings:
        # Parsed once at start-up, so a malformed key fails there, naming the setting.
        keys = parse_keys(self.keys.get_secret_value()) if self.keys else {}
        if self.keys_file:
            try:
                text = Path(self.keys_file).read_text()
            except OSError as error:
                raise KeyConfigError(
                    f"{KEYS_FILE_SETTING}: cannot read {self.keys_file!r}: {error}"
                ) from None
            for key_id, key in parse_keys(text, setting=KEYS_FILE_SETTING).items():
                if keys.setdefault(key_id, key) != key:
                    raise KeyConfigError(
                        f"key id {key_id!r} has two different keys in the settings"
                    )
        self._keyring = Keyring(keys, self.active_key or None)
        return self

    @property
    def keyring(self) -> Keyring:
        return self._keyring


class LoggingSettings(BaseModel):
    """Log format and level: JSON lines when deployed, plain text locally."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_lines: bool = False


def shared_env_defaults(prefix: str = "FLYWHEEL_") -> dict[str, str]:
    """Variables given once for every service (`FLYWHEEL_KAFKA__...`), as a mapping."""
    groups = ("KAFKA__", "POSTGRES__", "CONTROL__", "LOGGING__", "ENCRYPTION__")
    return {
        key.removeprefix(prefix): value
        for key, value in os.environ.items()
        if key.startswith(prefix) and key.removeprefix(prefix).startswith(groups)
    }


class ServiceSettings(BaseSettings):
    """Base of every service's settings: the shared groups plus the service's own."""

    model_config = SettingsConfigDict(
        env_nested_delimiter="__", extra="ignore", case_sensitive=False
    )

    logging: LoggingSettings = Field(default_factory=LoggingSettings)

    @classmethod
    def load(cls, **overrides: Any) -> Any:
        """Build the settings from shared variables, the service's own, then overrides.

        Precedence, lowest first: defaults, `FLYWHEEL_<GROUP>__*`, the service-prefixed
        variables, explicit keyword overrides.
        """
        shared: dict[str, Any] = {}
        for key, value in shared_env_defaults().items():
            group, _, field = key.lower().partition("__")
            shared.setdefault(group, {})[field] = value
        own = cls()
        merged = _deep_merge(shared, own.model_dump(exclude_unset=True))
        merged = _deep_merge(merged, overrides)
        return cls.model_validate(merged)


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
