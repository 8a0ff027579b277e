"""The report's settings (env prefix FLYWHEEL_REPORT_; FLYWHEEL_POSTGRES__* apply)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import PostgresSettings, ServiceSettings


class ReportSettings(ServiceSettings):
    """Where the data is and where the report goes."""

    model_config = SettingsConfigDict(
        env_prefix="FLYWHEEL_REPORT_", env_nested_delimiter="__", extra="ignore"
    )

    postgres: PostgresSettings = Field(default_factory=PostgresSettings)
    out_dir: str = "reports"
