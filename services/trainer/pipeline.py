"""A training cycle (dataset, fine-tune, registry, staging, canary); the scheduler."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
from croniter import croniter

from services.common.lifecycle import sleep_or_stop
from services.trainer import runs, snapshot, staging
from services.trainer.backends import (
    LocalBackend,
    OpenAIBackend,
    TrainedModel,
    TrainingBackend,
)
from services.trainer.datasets import TokenCounter, approx_tokens, tokenizer_counter
from services.trainer.errors import TrainerError
from services.trainer.rollout import RolloutController
from services.trainer.settings import TrainerSettings
from services.trainer.store import TRAINING_LOCK, ModelVersion, Registry

logger = logging.getLogger(__name__)

MIN_TRAIN_ROWS = 4


def default_backend(settings: TrainerSettings) -> TrainingBackend:
    if settings.backend == "openai":
        return OpenAIBackend(settings.openai)
    return LocalBackend(settings.training, Path(settings.adapters_dir))


def load_token_counter(tokenizer_path: str) -> TokenCounter:
    """The base model's tokenizer as a counter (blocking: run it in a thread)."""
    from transformers import AutoTokenizer

    from services.inference.settings import ModelSource

    source = ModelSource(model_path=Path(tokenizer_path) if tokenizer_path else None)
    folder, gguf_file = source.resolve()
    options: dict[str, Any] = {"local_files_only": True}
    if gguf_file:
        options["gguf_file"] = gguf_file
    return tokenizer_counter(AutoTokenizer.from_pretrained(folder, **options))


class Pipeline:
    """Runs training cycles for one route when the scheduler says so."""

    def __init__(
        self,
        settings: TrainerSettings,
        registry: Registry,
        controller: RolloutController,
        backend: TrainingBackend | None = None,
    ) -> None:
        self._settings = settings
        self._registry = registry
        self._controller = controller
        self._backend = backend or default_backend(settings)
        self._counter: asyncio.Task[TokenCounter] | None = None
        self.last_cycle: dict[str, Any] = {}

    def preload_tokenizer(self) -> None:
        """Start loading the tokenizer in a thread, once; cycles await it."""
        wanted = self._settings.token_count == "tokenizer"  # noqa: S105 - a mode
        if self._counter is None and wanted:
            self._counter = asyncio.create_task(
                asyncio.to_thread(load_token_counter, self._settings.tokenizer_path)
            )

    async def token_counter(self) -> TokenCounter:
        """The real tokenizer's counter when it loads, else the approximation."""
        self.preload_tokenizer()
        if self._counter is None:
            return approx_tokens
        try:
            return await self._counter
        except Exception as error:  # noqa: BLE001 - any failure: fall back, logged
            logger.warning(
                "tokenizer unavailable, counting tokens approximately: %r", error
            )
            return approx_tokens

    async def _register(
        self, production: ModelVersion, dataset_id: str
    ) -> ModelVersion:
        route = self._settings.route
        number = await self._registry.next_version_number(route)
        version_id = f"{route}-v{number}"
        candidate = ModelVersion(
            version_id=version_id,
            route=route,
            base_model=production.base_model,
            adapter=None,
            upstream_url=production.upstream_url,
            state="training",
            parent_version=production.version_id,
            dataset_id=dataset_id,
        )
        lineage = {
            "backend": self._settings.backend,
            "training": self._settings.training.model_dump(),
            "openai": self._settings.openai.model_dump(exclude={"api_key"}),
            "staging": self._settings.staging.model_dump(),
        }
        await self._registry.register_version(
            self._registry.pool, candidate, settings=lineage
        )
        return candidate

    async def _train(
        self, candidate: ModelVersion, production: ModelVersion, dataset_dir: Path
    ) -> ModelVersion:
        registry = self._registry
        try:
            trained: TrainedModel = await self._backend.train(
                dataset_dir, candidate.version_id, production
            )
        except TrainerError as error:
            await registry.set_scores(candidate.version_id, {"error": str(error)})
            await registry.set_state(registry.pool, candidate.version_id, "rejected")
            raise
        await registry.set_target(
            candidate.version_id,
            base_model=trained.base_model,
            adapter=trained.adapter,
            upstream=trained.upstream_url,
        )
        await registry.set_scores(candidate.version_id, {"training": trained.report})
        await registry.set_state(registry.pool, candidate.version_id, "staged")
        return ModelVersion(
            **{
                **candidate.__dict__,
                "base_model": trained.base_model,
                "adapter": trained.adapter,
                "upstream_url": trained.upstream_url,
                "state": "staged",
            }
        )

    async def run_cycle(self, window_end: datetime) -> dict[str, Any]:
        """Dataset -> fine-tune -> register -> staging -> canary (or rejected)."""
        settings, route = self._settings, self._settings.route
        timings: dict[str, float] = {}
        loop = asyncio.get_running_loop()

        # 1. Curate a dataset snapshot of everything rated up to the window's end.
        started = loop.time()
        dataset = await snapshot.build_dataset(
            self._registry.pool,
            route,
            window_end=window_end,
            exclude=(settings.exclude_metadata_key, settings.exclude_metadata_value),
            holdout_share=settings.holdout_share,
            max_tokens=settings.max_example_tokens,
            out_dir=Path(settings.datasets_dir),
            count_tokens=await self.token_counter(),
            keyring=settings.encryption.keyring,
        )
        timings["dataset_s"] = loop.time() - started
        if len(dataset.train) < MIN_TRAIN_ROWS:
            logger.info("cycle skipped: %d training rows", len(dataset.train))
            return {"outcome": "skipped", "dataset": dataset.dataset_id}

        # 2. Register the candidate as training, then fine-tune it.
        production = await self._registry.production(route)
        assert production is not None, "ensure_bootstrap runs before the scheduler"
        candidate = await self._register(production, dataset.dataset_id)
        started = loop.time()
        candidate = await self._train(
            candidate, production, Path(settings.datasets_dir) / dataset.dataset_id
        )
        timings["training_s"] = loop.time() - started

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
            api_keys={
                settings.openai.base_url: settings.openai.api_key.get_secret_value()
            },
        )
        timings["staging_s"] = loop.time() - started
        await self._registry.set_scores(candidate.version_id, verdict.as_scores())
        logger.info(
            "staging done version=%s passed=%s reason=%s",
            candidate.version_id,
            verdict.passed,
            verdict.reason,
        )

        # 4. Only a candidate that passed staging ever gets traffic, and under the
        #    `approve` policy only once a person approved it.
        outcome = await self._after_staging(candidate, verdict.passed)
        self.last_cycle = {
            "outcome": outcome,
            "version": candidate.version_id,
            "dataset": dataset.dataset_id,
            "counts": dataset.counts(),
            "timings": timings,
            "staging": verdict.__dict__,
        }
        return self.last_cycle

    async def _after_staging(self, candidate: ModelVersion, passed: bool) -> str:
        registry, route = self._registry, candidate.route
        if not passed:
            await registry.set_state(registry.pool, candidate.version_id, "rejected")
            return "rejected"
        if self._controller.policy(route) == "approve":
            logger.info(
                "candidate awaits approval version=%s: run `flywheel approve %s`",
                candidate.version_id,
                route,
            )
            return "awaiting_approval"
        await self._controller.start(candidate, self._settings.rollout_steps)
        return "canary"

    async def due(self, since: datetime | None, next_cron: datetime | None) -> bool:
        """Whether a run should start now: cron time reached or enough new ratings.

        Never while a rollout runs or a candidate waits for its approval.
        """
        route = self._settings.route
        if await self._registry.running_rollout(route) is not None:
            return False
        if await self._registry.awaiting_traffic(route) is not None:
            return False
        if next_cron is not None and datetime.now(UTC) >= next_cron:
            return True
        new_rated = await snapshot.count_new_rated(self._registry.pool, route, since)
        return new_rated >= self._settings.min_new_rated

    async def schedule_loop(self, stop: asyncio.Event) -> None:
        """Start a run when due; one at a time across replicas; retry with backoff."""
        settings = self._settings
        cron = croniter(settings.cron, datetime.now(UTC)) if settings.cron else None
        next_cron = cron.get_next(datetime) if cron else None
        self.preload_tokenizer()
        while not stop.is_set():
            delay_s = settings.check_interval_s
            try:
                since = await runs.window_end(self._registry.pool, settings.route)
                if await self.due(since, next_cron):
                    state = await self.run_locked()
                    if state == "failed":
                        delay_s = await self._retry_delay_s()
                    elif state != "busy" and cron is not None:
                        next_cron = cron.get_next(datetime)
            except (OSError, asyncpg.PostgresError) as error:
                logger.warning("scheduler check failed, retrying: %r", error)
            await sleep_or_stop(stop, delay_s)

    async def _retry_delay_s(self) -> float:
        settings = self._settings
        failed = await runs.failed_attempts(self._registry.pool, settings.route)
        delay_s = min(
            settings.retry_max_s, settings.retry_base_s * 2.0 ** max(0, failed - 1)
        )
        logger.warning(
            "training run failed attempt=%d of %d retry_in_s=%.1f",
            failed,
            settings.max_run_attempts,
            delay_s,
        )
        return delay_s

    async def run_locked(self) -> str:
        """One run if no other replica is running one: its state, or `busy`."""
        key = (self._settings.postgres.db_schema, TRAINING_LOCK)
        async with self._registry.pool.acquire() as connection:
            locked = await connection.fetchval(
                "SELECT pg_try_advisory_lock(hashtext($1), $2)", *key
            )
            if not locked:
                return "busy"
            try:
                return await self._recorded_run()
            finally:
                await connection.execute(
                    "SELECT pg_advisory_unlock(hashtext($1), $2)", *key
                )

    async def _recorded_run(self) -> str:
        """Run a cycle and record it in training_runs (see services/trainer/runs.py)."""
        pool, route = self._registry.pool, self._settings.route
        attempt = await runs.failed_attempts(pool, route) + 1
        window = datetime.now(UTC)
        run_id = await runs.start_run(pool, route, window, attempt)
        try:
            result = await self.run_cycle(window)
        except TrainerError as error:
            give_up = not error.retriable or attempt >= self._settings.max_run_attempts
            state = "abandoned" if give_up else "failed"
            logger.error(
                "training run %s run=%s attempt=%d: %s", state, run_id, attempt, error
            )
            await runs.finish_run(pool, run_id, state, error=str(error))
            return state
        except asyncio.CancelledError:
            await asyncio.shield(
                runs.finish_run(pool, run_id, "failed", error="interrupted by a stop")
            )
            raise
        state = "skipped" if result["outcome"] == "skipped" else "succeeded"
        await runs.finish_run(
            pool,
            run_id,
            state,
            dataset_id=result.get("dataset"),
            version_id=result.get("version"),
            outcome=result["outcome"],
            timings=result.get("timings"),
        )
        return state
