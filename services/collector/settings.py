"""The collector's settings (env prefix `FLYWHEEL_COLLECTOR_`)."""

from __future__ import annotations

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from services.common.settings import (
    EncryptionSettings,
    KafkaSettings,
    PostgresSettings,
    ServiceSettings,
)

MIB = 1024 * 1024


class CollectorSettings(ServiceSettings):
    """How the collector consumes, batches, stores and reports."""

    model_config = SettingsConfigDict(
        env_prefix="FLYWHEEL_COLLECTOR_",
        env_nested_delimiter="__",
        extra="ignore",
        case_sensitive=False,
    )

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    postgres: PostgresSettings = Field(default_factory=PostgresSettings)
    # Seals message content on write when a key is active (FLYWHEEL_ENCRYPTION__*).
    encryption: EncryptionSettings = Field(default_factory=EncryptionSettings)

    group_id: str = "collector"
    client_id: str = "flywheel-collector"
    # Each batch is one PostgreSQL transaction (one WAL flush) and one offset
    # commit: larger batches amortize both; a crash replays at most one batch.
    max_batch_size: int = Field(default=2000, ge=1, le=50_000)
    batch_timeout_ms: int = Field(default=500, ge=1, le=60_000)
    # Larger records are dead-lettered unread (reason `oversized_payload`).
    max_payload_bytes: int = Field(default=MIB, ge=1024)
    # A dead letter carries at most this much of its record's value (base64 adds a
    # third): the default fits Kafka's usual 1 MiB message limit. Raise it only with
    # the dead-letter topic's max.message.bytes (the producer follows this setting).
    dead_letter_max_value_bytes: int = Field(default=512 * 1024, ge=1024)
    # Runs the shared migrations at start; the embedded default relies on it.
    migrate_on_start: bool = True

    # Backoff while PostgreSQL is unavailable: doubles from min to max.
    store_retry_min_s: float = Field(default=0.2, gt=0)
    store_retry_max_s: float = Field(default=10.0, gt=0)
    kafka_timeout_s: float = Field(default=30.0, gt=0)

    # The port of /metrics, /livez and /readyz; 0 turns them off (the metrics are
    # still kept in-process).
    metrics_port: int = Field(default=9101, ge=0, le=65_535)
    # NOTE: loopback by default; a deployment that is scraped from another host
    # sets FLYWHEEL_COLLECTOR_METRICS_HOST=0.0.0.0.
    metrics_host: str = "127.0.0.1"
    orphan_refresh_s: float = Field(default=30.0, gt=0)
    # Feedback stored within this window is checked for a missing interaction
    # (an index range scan instead of the whole table); 0 checks every row.
    orphan_window_s: float = Field(default=86_400.0, ge=0)
    report_interval_s: float = Field(default=60.0, gt=0)
    # /livez fails when the consume loop has neither polled Kafka nor retried a
    # batch for this long. Each step of the loop is bounded by kafka_timeout_s,
    # postgres.command_timeout_s or store_retry_max_s: keep it well above them.
    liveness_timeout_s: float = Field(default=180.0, gt=0)

    # Interactions and feedback are partitioned by UTC day of storage: partitions are
    # created this many days ahead, at start and every partition_refresh_s.
    partition_days_ahead: int = Field(default=7, ge=1, le=366)
    # Stored events (and their de-duplication keys) older than this many days are
    # dropped; 0 keeps everything. Keep Kafka's retention shorter, or an event
    # replayed after it expired is stored again.
    retention_days: int = Field(default=0, ge=0)
    partition_refresh_s: float = Field(default=3600.0, gt=0)

    @model_validator(mode="after")
    def _check_liveness_bound(self) -> CollectorSettings:
        step_s = max(
            self.kafka_timeout_s,
            self.postgres.command_timeout_s,
            self.store_retry_max_s,
            self.batch_timeout_ms / 1000,
        )
        if self.liveness_timeout_s < 2 * step_s:
            raise ValueError(
                f"liveness_timeout_s ({self.liveness_timeout_s:g}) must be at least "
                f"twice the longest step of the consume loop ({step_s:g} s), or a slow "
                "but healthy collector is restarted"
            )
        return self
