"""The trainer's settings: registry, scheduler, fine-tuning, staging, rollout."""

from __future__ import annotations

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import SettingsConfigDict

from services.common.settings import (
    ControlPlaneSettings,
    PostgresSettings,
    ServiceSettings,
)


class TrainingOptions(BaseModel):
    """LoRA fine-tuning options for the local backend."""

    epochs: int = Field(default=6, ge=1)
    max_steps: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=8, ge=1)
    learning_rate: float = Field(default=5e-4, gt=0)
    rank: int = Field(default=16, ge=1)
    seed: int = 1234
    timeout_s: float = Field(default=1800.0, gt=0)


class StagingOptions(BaseModel):
    """How a candidate is judged before it gets any traffic.

    The gate: on prompts it was trained on, the candidate must beat production (it
    learned what it was taught); on the held-out prompts it must not be worse than
    production by more than `max_holdout_regression` (it did not forget).
    """

    max_prompts: int = Field(default=16, ge=1)
    max_holdout_regression: float = Field(default=0.05, ge=0, le=1)
    min_trained_gain: float = Field(default=0.0, ge=0, le=1)
    max_tokens: int = Field(default=48, ge=1)


class TrainerSettings(ServiceSettings):
    """Everything the trainer needs; env prefix FLYWHEEL_TRAINER_."""

    model_config = SettingsConfigDict(
        env_prefix="FLYWHEEL_TRAINER_", env_nested_delimiter="__", extra="ignore"
    )

    postgres: PostgresSettings = Field(default_factory=PostgresSettings)
    control: ControlPlaneSettings = Field(default_factory=ControlPlaneSettings)
    grpc_host: str = "127.0.0.1"
    grpc_port: int = Field(default=50051, ge=1, le=65535)
    metrics_port: int = Field(default=9103, ge=0, le=65535)

    # The route seeded into an empty registry, served by the base model.
    route: str = "capitals-bot"
    inference_base_url: str = "http://127.0.0.1:8300/v1"
    base_model: str = "SmolLM2-135M-Instruct"
    adapters_dir: str = ".data/adapters"
    datasets_dir: str = ".data/datasets"

    # Scheduler: a run starts when this many new rated interactions arrived since the
    # last dataset, checked every `check_interval_s`; a cron expression adds runs at
    # fixed times (empty: threshold only). One run at a time across replicas.
    min_new_rated: int = Field(default=200, ge=1)
    cron: str = ""
    check_interval_s: float = Field(default=5.0, gt=0)
    max_run_attempts: int = Field(default=3, ge=1)

    # Interactions whose request metadata carries this key=value are an evaluation
    # set and never become training data.
    exclude_metadata_key: str = "flywheel_split"
    exclude_metadata_value: str = "eval"
    holdout_share: float = Field(default=0.2, ge=0, lt=1)
    max_example_tokens: int = Field(default=256, ge=16)

    training: TrainingOptions = Field(default_factory=TrainingOptions)
    staging: StagingOptions = Field(default_factory=StagingOptions)

    # Canary steps as treatment percentages; the step after the last is production.
    # Each step is its own experiment and moves on only on the analyzer's verdict
    # (or `flywheel promote` / `flywheel rollback` by hand).
    rollout_steps: list[int] = Field(default_factory=lambda: [5, 25, 50])

    @field_validator("rollout_steps")
    @classmethod
    def _check_steps(cls, steps: list[int]) -> list[int]:
        if (
            not steps
            or any(not 0 < s < 100 for s in steps)
            or steps != sorted(set(steps))
        ):
            raise ValueError(
                f"rollout_steps must be increasing percentages in (0, 100), got {steps}"
            )
        return steps
