"""Judges the live experiments this worker owns, and reports every verdict."""

from __future__ import annotations

import logging
from typing import Any

from faust.types import TopicT

from services.analyzer import handlers, stats
from services.analyzer.errors import VerdictDeliveryError
from services.analyzer.metrics import ArmGauges, ExperimentGauges
from services.analyzer.publisher import VerdictReporter, to_result, to_verdict
from services.analyzer.settings import AnalyzerSettings
from services.common.events import encode
from services.common.routing_client import RoutingTableWatcher

logger = logging.getLogger(__name__)

ARMS = ("control", "treatment")


class ExperimentJudge:
    """Evaluates each owned experiment on a timer; publishes and reports the result."""

    def __init__(
        self,
        settings: AnalyzerSettings,
        watcher: RoutingTableWatcher,
        experiment_arms: Any,
        experiments_topic: TopicT,
    ) -> None:
        self._policy = settings.experiments.policy()
        self._watcher = watcher
        self._experiment_arms = experiment_arms
        self._experiments_topic = experiments_topic
        self._observations_topic_name = f"{settings.app_id}-experiment-observations"
        self._reporter = VerdictReporter(
            settings.control, timeout_s=settings.experiments.report_timeout_s
        )
        self._latest: dict[str, ExperimentGauges] = {}

    def gauges(self) -> tuple[ExperimentGauges, ...]:
        return tuple(self._latest[key] for key in sorted(self._latest))

    async def evaluate_owned(self) -> None:
        """Evaluate every live experiment whose totals this worker owns."""
        app = self._experiments_topic.app
        owned = {
            tp.partition
            for tp in app.assignor.assigned_actives()
            if tp.topic == self._observations_topic_name
        }
        seen: set[str] = set()
        for experiment_id, value in list(self._experiment_arms.items()):
            if value is None or value.get("partition") not in owned:
                continue
            live, planned = handlers.planned_split(
                self._watcher.table, value["route"], experiment_id
            )
            if not live:
                continue
            seen.add(experiment_id)
            await self._evaluate(experiment_id, value, planned)
        for gone in set(self._latest) - seen:
            del self._latest[gone]

    async def _evaluate(
        self,
        experiment_id: str,
        value: dict[str, Any],
        planned: dict[str, float] | None,
    ) -> None:
        control, treatment = (handlers.arm_totals(value, arm) for arm in ARMS)
        evaluation = stats.evaluate(control, treatment, planned, self._policy)
        result = to_result(
            experiment_id, value["route"], evaluation, [control, treatment]
        )
        self._latest[experiment_id] = ExperimentGauges(
            route=result.route,
            experiment_id=experiment_id,
            decision=evaluation.decision,
            lift=result.lift,
            lift_low=result.lift_low,
            lift_high=result.lift_high,
            p_value=result.p_value,
            srm_p_value=result.srm_p_value,
            arms=tuple(
                ArmGauges(arm.arm, arm.requests, arm.rated, arm.units)
                for arm in (control, treatment)
            ),
        )
        logger.info(
            "experiment evaluated experiment=%s route=%s decision=%s reason=%s",
            experiment_id,
            result.route,
            result.decision,
            result.reason,
        )
        await self._experiments_topic.send(
            key=experiment_id.encode(), value=encode(result)
        )
        try:
            ack = await self._reporter.report(to_verdict(result))
        except VerdictDeliveryError as error:
            logger.warning("verdict not delivered, retrying next time: %s", error)
            return
        logger.info(
            "verdict delivered experiment=%s decision=%s action=%s routing_version=%d",
            experiment_id,
            result.decision,
            ack.action,
            ack.routing_version,
        )

    async def close(self) -> None:
        await self._reporter.close()
