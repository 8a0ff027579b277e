"""The gateway's settings (env prefix `FLYWHEEL_GATEWAY_`)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    Field,
    FilePath,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import SettingsConfigDict

from services.common.settings import (
    ControlPlaneSettings,
    KafkaSettings,
    ServiceSettings,
)

DEV_API_KEY = "fw-dev-key"
DEV_PSEUDONYM_KEY = "flywheel-dev-pseudonym-key"
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def hash_api_key(key: str) -> str:
    """The form API keys are stored in: the SHA-256 hex digest of the key."""
    return hashlib.sha256(key.encode()).hexdigest()


class ModelPrice(BaseModel):
    """What an upstream model costs, in US dollars per 1,000 tokens."""

    prompt_per_1k_usd: float = Field(default=0.0, ge=0)
    completion_per_1k_usd: float = Field(default=0.0, ge=0)


class RateLimit(BaseModel):
    """A token bucket: `requests_per_s` on average, up to `burst` at once."""

    requests_per_s: float = Field(gt=0)
    burst: int = Field(default=1, ge=1)


class GatewaySettings(ServiceSettings):
    """Everything the gateway reads at start-up."""

    model_config = SettingsConfigDict(
        env_prefix="FLYWHEEL_GATEWAY_", env_nested_delimiter="__", extra="ignore"
    )

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    # TLS for the clients' connections: a PEM certificate (with its chain) and its
    # key, both or neither. Neither serves plain HTTP (behind an ingress or a mesh
    # that terminates TLS, or on loopback).
    tls_cert_file: FilePath | None = None
    tls_key_file: FilePath | None = None
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    control: ControlPlaneSettings = Field(default_factory=ControlPlaneSettings)

    # SHA-256 hex of each API key -> the project it belongs to. Keys are never stored
    # in clear; `hash_api_key` computes the digest.
    api_keys: dict[str, str] = Field(
        default_factory=lambda: {hash_api_key(DEV_API_KEY): "default"}
    )
    # Rate limits (none: unlimited). `rate_limit` applies to each key on its own;
    # `key_rate_limits` (by the key's SHA-256 hex) replaces it for one key;
    # `project_rate_limits` (by project id) is shared by all keys of a project.
    # A request must fit every bucket that applies; else 429 with Retry-After.
    rate_limit: RateLimit | None = None
    key_rate_limits: dict[str, RateLimit] = Field(default_factory=dict)
    project_rate_limits: dict[str, RateLimit] = Field(default_factory=dict)

    # Recent interaction ids -> project, remembered to refuse cross-project
    # feedback; the oldest are forgotten past this many.
    recent_interactions_max: int = Field(default=200_000, ge=1)
    # Feedback for an id this gateway does not remember (another replica served
    # it, a restart, or forgotten): "accept" publishes it with the rater's project
    # for downstream to check; "refuse" answers 404 as for another project's id.
    unknown_interaction_feedback: Literal["accept", "refuse"] = "accept"

    # Key of the HMAC that turns user and session ids into pseudonyms.
    pseudonym_key: SecretStr = SecretStr(DEV_PSEUDONYM_KEY)

    # A JSON routing table (RoutingTable.to_json shape) to serve instead of
    # following the trainer's control plane, for running without a trainer.
    routing_table_file: Path | None = None

    upstream_timeout_s: float = Field(default=120.0, gt=0)
    upstream_connect_timeout_s: float = Field(default=5.0, gt=0)
    upstream_max_connections: int = Field(default=512, ge=1)
    # Largest non-streamed upstream answer read (it is held whole in memory); a
    # larger one is a bad upstream response (502, and a fallback when configured).
    upstream_max_response_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    # A failed upstream call is sent again, up to `upstream_retries` more times, when
    # the failure says nothing was done: the connection failed, or the upstream
    # answered 429, 500, 502, 503 or 504. Waits between tries grow from
    # `upstream_retry_backoff_s`, doubling, with full jitter, capped at
    # `upstream_retry_backoff_max_s`. Timeouts are not retried: the upstream may
    # still be generating (and billing) the first answer.
    upstream_retries: int = Field(default=2, ge=0, le=10)
    upstream_retry_backoff_s: float = Field(default=0.05, ge=0)
    upstream_retry_backoff_max_s: float = Field(default=2.0, ge=0)
    # When the routed variant still fails (retriable failure or timeout), hand the
    # call to the route's other variants in routing-table order before answering
    # with the error. Only before the first byte reaches the client.
    upstream_fallback: bool = True
    # Bearer keys sent upstream, by variant base URL (e.g. for OpenAI itself).
    upstream_api_keys: dict[str, SecretStr] = Field(default_factory=dict)
    # Price per upstream model name; unknown models cost 0.
    prices: dict[str, ModelPrice] = Field(default_factory=dict)

    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    max_batch_items: int = Field(default=1000, ge=1)

    publish_queue_size: int = Field(default=10_000, ge=1)
    # Where events wait on disk while the broker does not take them (none: they are
    # dropped and counted). Replayed in order, also after a restart.
    spool_dir: Path | None = None
    spool_max_bytes: int = Field(default=1 << 30, ge=1 << 16)
    spool_fsync_interval_s: float = Field(default=0.2, gt=0)
    publish_batch_size: int = Field(default=500, ge=1)
    flush_timeout_s: float = Field(default=10.0, gt=0)
    startup_timeout_s: float = Field(default=30.0, gt=0)
    graceful_shutdown_s: float = Field(default=15.0, gt=0)

    @model_validator(mode="after")
    def _check_tls(self) -> GatewaySettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError(
                "set both FLYWHEEL_GATEWAY_TLS_CERT_FILE and "
                "FLYWHEEL_GATEWAY_TLS_KEY_FILE, or neither (plain HTTP)"
            )
        return self

    @field_validator("api_keys")
    @classmethod
    def _check_api_keys(cls, value: dict[str, str]) -> dict[str, str]:
        for digest in value:
            if not _SHA256_HEX.match(digest):
                raise ValueError(
                    "api_keys must map the lowercase SHA-256 hex of each key to a "
                    f"project id, got a key of {len(digest)} characters; store "
                    "hash_api_key(<key>), never the key itself"
                )
        return value
