"""The trainer's settings: registry, scheduler, fine-tuning, staging, rollout."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from services.common.settings import (
    ControlPlaneSettings,
    EncryptionSettings,
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


class OpenAIBackendSettings(BaseModel):
    """The `openai` fine-tuning backend: where the API is and how to follow a job."""

    base_url: str = "https://api.openai.com/v1"
    api_key: SecretStr = SecretStr("")
    # The base model to fine-tune, and the fine-tuning method (chat rows for
    # `supervised`, preference pairs for `dpo`).
    model: str = "gpt-4o-mini-2024-07-18"
    method: Literal["supervised", "dpo"] = "supervised"
    n_epochs: int | None = Field(default=None, ge=1)
    # Polls start at `poll_initial_s` and double up to `poll_max_s`; past
    # `timeout_s` the job is cancelled.
    poll_initial_s: float = Field(default=5.0, gt=0)
    poll_max_s: float = Field(default=60.0, gt=0)
    timeout_s: float = Field(default=6 * 3600.0, gt=0)
    request_timeout_s: float = Field(default=60.0, gt=0)
    max_retries: int = Field(default=3, ge=0)


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
    # Opens sealed message content when datasets are built (FLYWHEEL_ENCRYPTION__*).
    encryption: EncryptionSettings = Field(default_factory=EncryptionSettings)
    grpc_host: str = "127.0.0.1"
    grpc_port: int = Field(default=50051, ge=1, le=65535)
    metrics_host: str = "127.0.0.1"
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
    # A failed run is retried after retry_base_s, then twice as long each time (at
    # most retry_max_s); after max_run_attempts it is given up and the window moves
    # on, so the next run waits for new signals.
    retry_base_s: float = Field(default=10.0, gt=0)
    retry_max_s: float = Field(default=600.0, gt=0)

    # Interactions whose request metadata carries this key=value are an evaluation
    # set and never become training data.
    exclude_metadata_key: str = "flywheel_split"
    exclude_metadata_value: str = "eval"
    holdout_share: float = Field(default=0.2, ge=0, lt=1)
    max_example_tokens: int = Field(default=256, ge=16)
    # Over-long examples are found by the base model's real tokenizer (loaded once,
    # about 20 s for the bundled GGUF file); `approx` counts four characters a token,
    # and is what runs when the tokenizer cannot be loaded.
    token_count: Literal["tokenizer", "approx"] = "tokenizer"  # noqa: S105 - not a secret
    tokenizer_path: str = ""

    # `local`: LoRA on the CPU (or a GPU) served by services/inference; `openai`: a
    # fine-tuning job on OpenAI's API (or any server speaking it).
    backend: Literal["local", "openai"] = "local"
    openai: OpenAIBackendSettings = Field(default_factory=OpenAIBackendSettings)

    training: TrainingOptions = Field(default_factory=TrainingOptions)
    staging: StagingOptions = Field(default_factory=StagingOptions)

    # Canary steps as treatment percentages; the step after the last is production.
    # Each step is its own experiment and moves on only on the analyzer's verdict
    # (or `flywheel promote` / `flywheel rollback` by hand).
    rollout_steps: list[int] = Field(default_factory=lambda: [5, 25, 50])

    # Rollout policy per route: `auto` moves on the analyzer's verdicts alone;
    # `approve` waits for `flywheel approve ROUTE` before a candidate gets any
    # traffic and before it is promoted to production. Routes not listed in
    # `route_policies` follow `policy`.
    policy: Literal["auto", "approve"] = "auto"
    route_policies: dict[str, Literal["auto", "approve"]] = Field(default_factory=dict)
    approvals_interval_s: float = Field(default=2.0, gt=0)

    def policy_for(self, route: str) -> str:
        """The rollout policy of `route`."""
        return self.route_policies.get(route, self.policy)

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
