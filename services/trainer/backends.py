"""Fine-tuning backends: `local` (LoRA in a subprocess) and `openai` (a hosted job).

Each turns an exported dataset folder into a servable model: where it is served
(upstream URL), under which model name, with which adapter, plus what the run
reported (losses, job id, ...), stored with the version's scores.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson

from services.trainer import openai_format
from services.trainer.errors import TrainingFailedError
from services.trainer.finetune_openai import OpenAIFineTuner
from services.trainer.settings import OpenAIBackendSettings, TrainingOptions
from services.trainer.store import ModelVersion

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainedModel:
    """Where a freshly trained candidate is served, and the run's own report."""

    base_model: str
    adapter: str | None
    upstream_url: str
    report: dict[str, Any] = field(default_factory=dict)


class TrainingBackend(Protocol):
    """Trains a candidate from a dataset folder (train.jsonl and friends)."""

    async def train(
        self, dataset_dir: Path, version_id: str, production: ModelVersion
    ) -> TrainedModel: ...


class LocalBackend:
    """LoRA with transformers + peft in a subprocess; the control plane stays live."""

    def __init__(self, options: TrainingOptions, adapters_dir: Path) -> None:
        self._options = options
        self._adapters_dir = adapters_dir

    def _command(self, train_file: Path, output_dir: Path) -> list[str]:
        options = self._options
        command = [sys.executable, "-m", "services.trainer.finetune_local"]
        command += ["--dataset", str(train_file), "--output", str(output_dir)]
        command += ["--epochs", str(options.epochs)]
        command += ["--learning-rate", str(options.learning_rate)]
        command += ["--rank", str(options.rank), "--seed", str(options.seed)]
        command += ["--batch-size", str(options.batch_size)]
        if options.max_steps:
            command += ["--max-steps", str(options.max_steps)]
        return command

    async def train(
        self, dataset_dir: Path, version_id: str, production: ModelVersion
    ) -> TrainedModel:
        command = self._command(
            dataset_dir / "train.jsonl", self._adapters_dir / version_id
        )
        process = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        try:
            stdout, stderr = await asyncio.wait_for(
                process.communicate(), self._options.timeout_s
            )
        except (TimeoutError, asyncio.CancelledError) as error:
            process.kill()
            await process.wait()
            if isinstance(error, asyncio.CancelledError):
                raise
            raise TrainingFailedError(
                f"fine-tuning ran past {self._options.timeout_s:.0f} s"
            ) from error
        if process.returncode != 0:
            tail = stderr.decode(errors="replace")[-2000:]
            raise TrainingFailedError(
                f"fine-tuning exited {process.returncode}: {tail}"
            )
        lines = [line for line in stdout.decode().splitlines() if line.startswith("{")]
        return TrainedModel(
            base_model=production.base_model,
            adapter=version_id,
            upstream_url=production.upstream_url,
            report=orjson.loads(lines[-1]) if lines else {},
        )


class OpenAIBackend:
    """A fine-tuning job on OpenAI's API; the candidate is served from there too."""

    def __init__(self, settings: OpenAIBackendSettings) -> None:
        self._settings = settings

    async def train(
        self, dataset_dir: Path, version_id: str, production: ModelVersion
    ) -> TrainedModel:
        dpo = self._settings.method == "dpo"
        train_file = dataset_dir / ("preference_train.jsonl" if dpo else "train.jsonl")

        # A file OpenAI would refuse is refused here, with every broken rule listed.
        violations = openai_format.validate_file(
            train_file, "preference" if dpo else "chat"
        )
        if violations:
            listed = "; ".join(str(v) for v in violations[:5])
            raise TrainingFailedError(
                f"{train_file.name} breaks OpenAI's format rules: {listed}",
                retriable=False,
            )

        tuner = OpenAIFineTuner(self._settings)
        try:
            job = await tuner.run(train_file, suffix=version_id)
        finally:
            await tuner.close()
        return TrainedModel(
            base_model=job.fine_tuned_model,
            adapter=None,
            upstream_url=self._settings.base_url,
            report=job.as_dict(),
        )
