"""The analyzer's settings (env prefix FLYWHEEL_ANALYZER_)."""

from __future__ import annotations

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import SettingsConfigDict

from services.analyzer.stats import ExperimentPolicy
from services.common.settings import (
    ControlPlaneSettings,
    KafkaSettings,
    ServiceSettings,
)


class ExperimentSettings(BaseModel):
    """How often experiments are looked at and when they are decided."""

    evaluate_interval_s: float = Field(default=5.0, gt=0)
    report_timeout_s: float = Field(default=5.0, gt=0)
    alpha: float = Field(default=0.05, gt=0, lt=1)
    # tau^2 of the mSPRT mixture over the positive-rate lift.
    mixing_variance: float = Field(default=0.01, gt=0)
    min_rated_per_arm: int = Field(default=30, ge=1)
    max_rated_per_arm: int = Field(default=400, ge=1)
    min_requests_per_arm: int = Field(default=30, ge=1)
    error_rate_margin: float = Field(default=0.02, ge=0, le=1)
    error_rate_ceiling: float = Field(default=0.2, gt=0, le=1)
    error_mixing_variance: float = Field(default=0.0025, gt=0)
    latency_margin_ratio: float = Field(default=0.25, gt=0)
    srm_alpha: float = Field(default=0.001, gt=0, lt=1)
    # Distinct assignment units kept per experiment for the sample-ratio check: exact
    # up to this many, a uniform hash sample of about half to all of it beyond
    # (services/analyzer/units.py). About 150 bytes of worker memory each.
    unit_sample_capacity: int = Field(default=50_000, ge=2)

    @model_validator(mode="after")
    def _check_caps(self) -> ExperimentSettings:
        if self.max_rated_per_arm < self.min_rated_per_arm:
            raise ValueError(
                f"experiments.max_rated_per_arm ({self.max_rated_per_arm}) must be at "
                f"least experiments.min_rated_per_arm ({self.min_rated_per_arm})"
            )
        return self

    def policy(self) -> ExperimentPolicy:
        return ExperimentPolicy(
            alpha=self.alpha,
            mixing_variance=self.mixing_variance,
            min_rated_per_arm=self.min_rated_per_arm,
            max_rated_per_arm=self.max_rated_per_arm,
            min_requests_per_arm=self.min_requests_per_arm,
            error_rate_margin=self.error_rate_margin,
            error_rate_ceiling=self.error_rate_ceiling,
            error_mixing_variance=self.error_mixing_variance,
            latency_margin_ratio=self.latency_margin_ratio,
            srm_alpha=self.srm_alpha,
        )


class AnalyzerSettings(ServiceSettings):
    """Everything `python -m services.analyzer` reads from the environment."""

    model_config = SettingsConfigDict(
        env_prefix="FLYWHEEL_ANALYZER_", env_nested_delimiter="__", extra="ignore"
    )

    # The faust app id: the consumer group and the prefix of its internal topics.
    app_id: str = Field(default="analyzer", pattern=r"^[a-z][a-z0-9_.-]{0,100}$")
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    control: ControlPlaneSettings = Field(default_factory=ControlPlaneSettings)
    experiments: ExperimentSettings = Field(default_factory=ExperimentSettings)
    # NOTE: loopback by default; a deployment that is scraped from another host sets
    # FLYWHEEL_ANALYZER_METRICS_HOST=0.0.0.0.
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=9102, ge=0, le=65535)
    # How long an interaction stays joinable with its feedback, and how long feedback
    # waits for an interaction that has not arrived (then it counts as an orphan).
    join_ttl_s: float = Field(default=3600.0, gt=0)
    pending_ttl_s: float = Field(default=3600.0, gt=0)
    expire_interval_s: float = Field(default=60.0, gt=0)
    # Where faust keeps its local files (the tables themselves live in memory and are
    # rebuilt from their changelog topics on start).
    data_dir: str = ".data/analyzer"
    # Upper bound of one produced record batch (changelogs, repartition, results).
    # NOTE: the embedded Tansu 0.6.0 broker answers ListOffsets(latest) with the last
    # batch's base offset + 1, so faust's changelog recovery stops before the rest of
    # a multi-record batch; 1 forces one record per batch, which sidesteps that.
    producer_max_batch_bytes: int = Field(default=16_384, ge=1)
    broker_session_timeout_s: float = Field(default=10.0, gt=0)
    broker_rebalance_timeout_s: float = Field(default=10.0, gt=0)
