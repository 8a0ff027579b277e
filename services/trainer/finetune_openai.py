"""The `openai` fine-tuning backend: upload, create and follow a job, record its model.

Works against OpenAI's fine-tuning API (`files`, `fine_tuning.jobs` create, retrieve,
cancel and events) through the `openai` client, or any server that speaks it. The
job is followed with a growing poll interval; a stop or the timeout cancels it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import openai
from openai import AsyncOpenAI

from services.common.lifecycle import sleep_or_stop
from services.trainer.errors import FineTuneCancelledError, TrainingFailedError
from services.trainer.settings import OpenAIBackendSettings

logger = logging.getLogger(__name__)

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


@dataclass(frozen=True)
class FineTuneJob:
    """A finished job: the model it produced and how it got there."""

    job_id: str
    training_file: str
    model: str
    fine_tuned_model: str
    status: str
    trained_tokens: int | None
    statuses: list[str]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _wrapped(error: openai.OpenAIError, doing: str) -> TrainingFailedError:
    """An API error as ours: 429, 5xx and connection failures are worth a retry."""
    if isinstance(error, openai.APIStatusError):
        retriable = error.status_code == 429 or error.status_code >= 500
        detail = f"HTTP {error.status_code}: {error.message}"
    else:
        retriable = isinstance(error, openai.APIConnectionError)
        detail = repr(error)
    return TrainingFailedError(f"{doing} failed: {detail}", retriable=retriable)


class OpenAIFineTuner:
    """Runs one fine-tuning job to its end on an OpenAI-compatible API."""

    def __init__(
        self, settings: OpenAIBackendSettings, client: AsyncOpenAI | None = None
    ) -> None:
        self._settings = settings
        self._client = client or AsyncOpenAI(
            base_url=settings.base_url,
            api_key=settings.api_key.get_secret_value() or "unset",
            timeout=settings.request_timeout_s,
            max_retries=settings.max_retries,
        )

    async def close(self) -> None:
        await self._client.close()

    async def run(
        self,
        train_file: Path,
        *,
        suffix: str,
        validation_file: Path | None = None,
        stop: asyncio.Event | None = None,
    ) -> FineTuneJob:
        """Upload, create, follow; the finished job, or an error saying why not."""
        training_id = await self._upload(train_file)
        validation_id = await self._upload(validation_file) if validation_file else None
        try:
            job = await self._client.fine_tuning.jobs.create(
                model=self._settings.model,
                training_file=training_id,
                validation_file=validation_id,
                suffix=suffix[:64],
                method=self._method(),  # type: ignore[arg-type]  # a plain dict
            )
        except openai.OpenAIError as error:
            raise _wrapped(error, "creating the fine-tuning job") from error
        logger.info(
            "fine-tuning job created job=%s model=%s file=%s",
            job.id,
            self._settings.model,
            training_id,
        )
        return await self._follow(job.id, training_id, stop or asyncio.Event())

    def _method(self) -> dict[str, Any]:
        kind = self._settings.method
        hyperparameters: dict[str, Any] = {}
        if self._settings.n_epochs is not None:
            hyperparameters["n_epochs"] = self._settings.n_epochs
        return {"type": kind, kind: {"hyperparameters": hyperparameters}}

    async def _upload(self, path: Path) -> str:
        try:
            with path.open("rb") as content:
                uploaded = await self._client.files.create(
                    file=(path.name, content), purpose="fine-tune"
                )
        except openai.OpenAIError as error:
            raise _wrapped(error, f"uploading {path.name}") from error
        logger.info("file uploaded file=%s bytes=%s", uploaded.id, uploaded.bytes)
        return uploaded.id

    async def _follow(
        self, job_id: str, training_id: str, stop: asyncio.Event
    ) -> FineTuneJob:
        settings = self._settings
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.timeout_s
        delay_s = settings.poll_initial_s
        statuses: list[str] = []
        while True:
            try:
                job = await self._client.fine_tuning.jobs.retrieve(job_id)
            except openai.OpenAIError as error:
                raise _wrapped(error, f"following job {job_id}") from error
            if not statuses or statuses[-1] != job.status:
                statuses.append(job.status)
                await self._log_events(job_id, job.status)
            if job.status in TERMINAL:
                break
            if stop.is_set() or loop.time() >= deadline:
                await self._cancel(job_id)
                why = "the trainer is stopping" if stop.is_set() else "timed out"
                raise FineTuneCancelledError(f"job {job_id} cancelled: {why}")
            # A growing interval: a job takes minutes to hours, polls stay cheap.
            await sleep_or_stop(stop, delay_s)
            delay_s = min(settings.poll_max_s, delay_s * 2)
        if job.status == "cancelled":
            raise FineTuneCancelledError(f"job {job_id} was cancelled")
        if job.status == "failed":
            failure = job.error
            code = failure.code if failure else "unknown"
            message = failure.message if failure else "no error given"
            # A file OpenAI refused will be refused again: no retry for those.
            raise TrainingFailedError(
                f"job {job_id} failed: {code}: {message}",
                retriable="invalid" not in (code or ""),
            )
        assert job.fine_tuned_model, "a succeeded job names its model"
        logger.info(
            "fine-tuning job succeeded job=%s model=%s trained_tokens=%s",
            job_id,
            job.fine_tuned_model,
            job.trained_tokens,
        )
        return FineTuneJob(
            job_id=job_id,
            training_file=training_id,
            model=job.model,
            fine_tuned_model=job.fine_tuned_model,
            status=job.status,
            trained_tokens=job.trained_tokens,
            statuses=statuses,
        )

    async def _log_events(self, job_id: str, status: str) -> None:
        try:
            events = await self._client.fine_tuning.jobs.list_events(job_id, limit=5)
        except openai.OpenAIError as error:
            logger.warning("fine-tuning events unavailable job=%s: %r", job_id, error)
            return
        latest = events.data[0].message if events.data else ""
        logger.info(
            "fine-tuning job status=%s job=%s latest_event=%r", status, job_id, latest
        )

    async def _cancel(self, job_id: str) -> None:
        try:
            await self._client.fine_tuning.jobs.cancel(job_id)
        except openai.OpenAIError as error:
            logger.warning("cancelling job=%s failed: %r", job_id, error)
