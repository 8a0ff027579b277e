"""Where experiment evaluations go: the experiments topic and the trainer (gRPC)."""

from __future__ import annotations

import logging

from grpc import aio

from services.analyzer.errors import VerdictDeliveryError
from services.analyzer.stats import ArmTotals, Decision, Evaluation
from services.common.control import auth_metadata, open_channel
from services.common.events import ExperimentResult
from services.common.pb.flywheel.v1 import control_pb2 as pb
from services.common.pb.flywheel.v1 import control_pb2_grpc as pb_grpc
from services.common.settings import ControlPlaneSettings

logger = logging.getLogger(__name__)

PROTO_DECISIONS = {
    Decision.CONTINUE: pb.DECISION_CONTINUE,
    Decision.PROMOTE: pb.DECISION_PROMOTE,
    Decision.ROLL_BACK: pb.DECISION_ROLL_BACK,
}


# ArmStatistics has no unit fields: the verdict carries only what the proto knows.
ARM_STATISTICS_FIELDS = frozenset(pb.ArmStatistics.DESCRIPTOR.fields_by_name)


def arm_summary(arm: ArmTotals) -> dict[str, object]:
    """One arm's numbers, as the ExperimentResult event carries them.

    `units` is the estimated count of distinct assignment units (users, else
    sessions, else requests), exact while it equals `units_sampled`; the
    sample-ratio check tests `units_sampled`.
    """
    return {
        "arm": arm.arm,
        "variant": arm.variant,
        "requests": arm.requests,
        "errors": arm.errors,
        "rated": arm.rated,
        "positive": arm.positive,
        "mean_latency_s": arm.mean_latency_s,
        "units": arm.units,
        "units_sampled": arm.units_sampled,
    }


def to_result(
    experiment_id: str, route: str, evaluation: Evaluation, arms: list[ArmTotals]
) -> ExperimentResult:
    """The event published to the experiments topic."""
    return ExperimentResult(
        experiment_id=experiment_id,
        route=route,
        decision=evaluation.decision.value,
        reason=evaluation.reason,
        arms=[arm_summary(arm) for arm in arms],
        lift=evaluation.lift.estimate,
        lift_low=evaluation.lift.low,
        lift_high=evaluation.lift.high,
        p_value=evaluation.lift.p_value,
        srm_p_value=evaluation.srm_p_value,
    )


def to_verdict(result: ExperimentResult) -> pb.ExperimentVerdict:
    """The gRPC message for the trainer, carrying the same numbers as the event."""
    return pb.ExperimentVerdict(
        experiment_id=result.experiment_id,
        route=result.route,
        decision=PROTO_DECISIONS[Decision(result.decision)],
        reason=result.reason,
        arms=[
            pb.ArmStatistics(
                **{k: v for k, v in arm.items() if k in ARM_STATISTICS_FIELDS}
            )
            for arm in result.arms
        ],
        lift=result.lift,
        lift_low=result.lift_low,
        lift_high=result.lift_high,
        p_value=result.p_value,
        srm_p_value=result.srm_p_value,
        computed_at=result.computed_at.timestamp(),
    )


class VerdictReporter:
    """Sends verdicts to the trainer's RolloutService over one reused channel."""

    def __init__(self, settings: ControlPlaneSettings, *, timeout_s: float) -> None:
        self._settings = settings
        self._timeout_s = timeout_s
        self._channel: aio.Channel | None = None

    async def report(self, verdict: pb.ExperimentVerdict) -> pb.VerdictAck:
        """Send one verdict; VerdictDeliveryError when the trainer did not take it."""
        if self._channel is None:
            self._channel = open_channel(self._settings)
        stub = pb_grpc.RolloutServiceStub(self._channel)
        try:
            ack: pb.VerdictAck = await stub.ReportVerdict(
                verdict,
                metadata=auth_metadata(self._settings),
                timeout=self._timeout_s,
            )
        except aio.AioRpcError as error:
            raise VerdictDeliveryError(
                f"trainer at {self._settings.address} did not take the verdict for "
                f"experiment {verdict.experiment_id}: {error.code().name} "
                f"{error.details()}"
            ) from error
        return ack

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
