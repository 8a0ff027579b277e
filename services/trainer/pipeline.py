"""A training cycle (dataset, LoRA, registry, staging, canary) and the scheduler."""

from __future__ import annotations

import asyncio
import logging
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from croniter import croniter

from services.common.lifecycle import sleep_or_stop
from services.trainer import datasets, staging
from services.trainer.rollout import RolloutController
from services.trainer.settings import TrainerSettings
from services.trainer.store import TRAINING_LOCK, ModelVersion, Registry

logger = logging.getLogger(__name__)

MIN_TRAIN_ROWS = 4


class TrainingFailedError(RuntimeError):
    """The fine-tuning subprocess failed or timed out (retriable)."""


class Pipeline:
    """Runs training cycles for one route when the scheduler says so."""

    def __init__(
        self,
        settings: TrainerSettings,
        registry: Registry,
        controller: RolloutController,
    ) -> None:
        self._settings = settings
        self._registry = registry
        self._controller = controller
        self.last_cycle: dict[str, Any] = {}

    async def fine_tune(self, train_file: Path, output_dir: Path) -> dict[str, Any]:
        """Run the local LoRA backend in a subprocess; the control plane stays live."""
        options = self._settings.training
        command = [
            sys.executable,
            "-m",
            "services.trainer.finetune_local",
            "--dataset",
            str(train_file),
            "--output",
            str(output_dir),
            "--epochs",
            str(options.epochs),
            "--learning-rate",
            str(options.learning_rate),
            "--rank",
            str(options.rank),
            "--seed",
            str(options.seed),
            "--batch-size",
            str(options.batch_size),
        ]
        if options.max_steps:
            command += ["--max-steps", str(options.max_steps)]
        process = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        try:
            stdout, stderr = await asyncio.wait_for(
                process.communicate(), options.timeout_s
            )
        except TimeoutError as error:
            process.kill()
            await process.wait()
            raise TrainingFailedError(
                f"fine-tuning ran past {options.timeout_s:.0f} s"
            ) from error
        if process.returncode != 0:
            tail = stderr.decode(errors="replace")[-2000:]
            raise TrainingFailedError(
                f"fine-tuning exited {process.returncode}: {tail}"
            )
        lines = [line for line in stdout.decode().splitlines() if line.startswith("{")]
        return orjson.loads(lines[-1]) if lines else {}

    async def run_cycle(self, window_end: datetime) -> dict[str, Any]:
        """Dataset -> fine-tune -> register -> staging -> canary (or rejected)."""
        settings, route = self._settings, self._settings.route
        timings: dict[str, float] = {}
        loop = asyncio.get_running_loop()

        # 1. Curate a dataset snapshot of everything rated up to the window's end.
        started = loop.time()
        dataset = await datasets.build_dataset(
            self._registry.pool,
            route,
            window_end=window_end,
            exclude=(settings.exclude_metadata_key, settings.exclude_metadata_value),
            holdout_share=settings.holdout_share,
            max_tokens=settings.max_example_tokens,
            out_dir=Path(settings.datasets_dir),
        )
        timings["dataset_s"] = loop.time() - started
        if len(dataset.train) < MIN_TRAIN_ROWS:
            logger.info("cycle skipped: %d training rows", len(dataset.train))
            return {"outcome": "skipped", "dataset": dataset.dataset_id}

        # 2. Register the candidate as training, then fine-tune it.
        production = await self._registry.production(route)
        assert production is not None, "ensure_bootstrap runs before the scheduler"
        number = await self._registry.next_version_number(route)
        version_id = f"{route}-v{number}"
        candidate = ModelVersion(
            version_id=version_id,
            route=route,
            base_model=production.base_model,
            adapter=version_id,
            upstream_url=production.upstream_url,
            state="training",
            parent_version=production.version_id,
            dataset_id=dataset.dataset_id,
        )
        await self._registry.register_version(
            self._registry.pool, candidate, settings=settings.training.model_dump()
        )
        started = loop.time()
        try:
            result = await self.fine_tune(
                Path(settings.datasets_dir) / dataset.dataset_id / "train.jsonl",
                Path(settings.adapters_dir) / version_id,
            )
        except TrainingFailedError:
            await self._registry.set_state(self._registry.pool, version_id, "rejected")
            raise
        timings["training_s"] = loop.time() - started
        await self._registry.set_scores(version_id, {"training": result})
        await self._registry.set_state(self._registry.pool, version_id, "staged")

        # 3. Staging: both models answer trained and held-out prompts.
        started = loop.time()
        verdict = await staging.evaluate(
            candidate,
            production,
            dataset.train,
            dataset.holdout,
            max_prompts=settings.staging.max_prompts,
            max_holdout_regression=settings.staging.max_holdout_regression,
            min_trained_gain=settings.staging.min_trained_gain,
            max_tokens=settings.staging.max_tokens,
        )
        timings["staging_s"] = loop.time() - started
        await self._registry.set_scores(version_id, verdict.as_scores())
        logger.info(
            "staging done version=%s passed=%s reason=%s",
            version_id,
            verdict.passed,
            verdict.reason,
        )

        # 4. Only a candidate that passed staging ever gets traffic.
        if not verdict.passed:
            await self._registry.set_state(self._registry.pool, version_id, "rejected")
            outcome = "rejected"
        else:
            await self._controller.start(
                ModelVersion(**{**candidate.__dict__, "state": "staged"}),
                settings.rollout_steps,
            )
            outcome = "canary"
        self.last_cycle = {
            "outcome": outcome,
            "version": version_id,
            "dataset": dataset.dataset_id,
            "train_rows": len(dataset.train),
            "holdout_rows": len(dataset.holdout),
            "timings": timings,
            "staging": verdict.__dict__,
        }
        return self.last_cycle

    async def _due(self, since: datetime | None, next_cron: datetime | None) -> bool:
        route = self._settings.route
        if await self._registry.running_rollout(route) is not None:
            return False
        if next_cron is not None and datetime.now(UTC) >= next_cron:
            return True
        new_rated = await datasets.count_new_rated(self._registry.pool, route, since)
        return new_rated >= self._settings.min_new_rated

    async def schedule_loop(self, stop: asyncio.Event) -> None:
        """Start a cycle when due; one at a time across replicas (advisory lock)."""
        cron = (
            croniter(self._settings.cron, datetime.now(UTC))
            if self._settings.cron
            else None
        )
        next_cron = cron.get_next(datetime) if cron else None
        attempts = 0
        while not stop.is_set():
            try:
                since = await datasets.last_window_end(
                    self._registry.pool, self._settings.route
                )
                if await self._due(since, next_cron):
                    ran = await self._run_locked()
                    if ran and cron is not None:
                        next_cron = cron.get_next(datetime)
                    attempts = 0
            except (TrainingFailedError, OSError) as error:
                attempts += 1
                delay_s = min(300.0, 5.0 * 2**attempts)
                logger.warning(
                    "training cycle failed attempt=%d retry_in_s=%.0f: %s",
                    attempts,
                    delay_s,
                    error,
                )
                if attempts >= self._settings.max_run_attempts:
                    logger.error("training cycle gave up after %d attempts", attempts)
                    attempts = 0
                await sleep_or_stop(stop, delay_s)
                continue
            await sleep_or_stop(stop, self._settings.check_interval_s)

    async def _run_locked(self) -> bool:
        key = (self._settings.postgres.db_schema, TRAINING_LOCK)
        async with self._registry.pool.acquire() as connection:
            locked = await connection.fetchval(
                "SELECT pg_try_advisory_lock(hashtext($1), $2)", *key
            )
            if not locked:
                return False
            try:
                await self.run_cycle(datetime.now(UTC))
            finally:
                await connection.execute(
                    "SELECT pg_advisory_unlock(hashtext($1), $2)", *key
                )
        return True
