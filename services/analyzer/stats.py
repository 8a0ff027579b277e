"""Experiment statistics: always-valid tests, guardrails, sample-ratio mismatch.

Pure code (numpy only), no Kafka: the analyzer looks at an experiment every few seconds,
so the tests must stay valid however often they are looked at. They are mixture
sequential probability ratio tests (mSPRT, Johari et al., "Always Valid Inference") on
the normal approximation: with an estimate `d` of an effect, its variance `V` and a
normal mixing distribution N(null, tau^2) over the alternative,

    Lambda = sqrt(V / (V + tau^2)) * exp(tau^2 (d - null)^2 / (2 V (V + tau^2)))

and P(Lambda ever reaches 1/alpha | null) <= alpha. So 1/Lambda is an always-valid
p-value and {null : Lambda < 1/alpha} an always-valid confidence interval.

Every function here takes scalars or numpy arrays alike, so the simulations in the
tests run vectorized.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np

Number = Any  # a float or a numpy array of floats


class Decision(StrEnum):
    """What the analyzer tells the rollout controller about an experiment."""

    CONTINUE = "continue"
    PROMOTE = "promote"
    ROLL_BACK = "roll_back"


@dataclass(frozen=True)
class SequentialEstimate:
    """An effect estimate with its always-valid confidence interval and p-value."""

    estimate: float
    low: float
    high: float
    p_value: float

    def above(self, bound: float) -> bool:
        return self.low > bound

    def below(self, bound: float) -> bool:
        return self.high < bound


def mixture_test(
    estimate: Number,
    variance: Number,
    mixing_variance: Number,
    alpha: float,
    null: Number = 0.0,
) -> tuple[Number, Number, Number]:
    """The mSPRT's always-valid (p-value, CI low, CI high) for `estimate`."""
    variance = np.maximum(variance, 1e-12)
    spread = variance + mixing_variance
    log_lambda = 0.5 * np.log(variance / spread) + mixing_variance * (
        estimate - null
    ) ** 2 / (2 * variance * spread)
    p_value = np.minimum(1.0, np.exp(-log_lambda))
    half_width = np.sqrt(
        variance
        * spread
        / mixing_variance
        * (2 * math.log(1 / alpha) + np.log(spread / variance))
    )
    return p_value, estimate - half_width, estimate + half_width


def smoothed_rate(successes: Number, trials: Number) -> Number:
    """A rate pulled slightly to 1/2 so that its variance is never zero."""
    return (np.asarray(successes) + 0.5) / (np.asarray(trials) + 1.0)


def proportion_lift(
    control_successes: Number,
    control_trials: Number,
    treatment_successes: Number,
    treatment_trials: Number,
    *,
    mixing_variance: float,
    alpha: float,
    null: float = 0.0,
) -> tuple[Number, Number, Number, Number]:
    """Treatment minus control rate: (lift, p-value, CI low, CI high), always valid."""
    control_trials = np.maximum(control_trials, 1)
    treatment_trials = np.maximum(treatment_trials, 1)
    lift = (
        np.asarray(treatment_successes) / treatment_trials
        - np.asarray(control_successes) / control_trials
    )
    control_rate = smoothed_rate(control_successes, control_trials)
    treatment_rate = smoothed_rate(treatment_successes, treatment_trials)
    variance = (
        control_rate * (1 - control_rate) / control_trials
        + treatment_rate * (1 - treatment_rate) / treatment_trials
    )
    p_value, low, high = mixture_test(lift, variance, mixing_variance, alpha, null)
    return lift, p_value, low, high


def chi_square_survival(statistic: float, degrees: int) -> float:
    """P(X >= statistic) for a chi-square variable with integer `degrees`."""
    if degrees < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {degrees}")
    if statistic <= 0:
        return 1.0
    half = statistic / 2
    if degrees % 2 == 0:
        term = total = math.exp(-half)
        for i in range(1, degrees // 2):
            term *= half / i
            total += term
        return min(1.0, total)
    total = math.erfc(math.sqrt(half))
    term = math.sqrt(2 * statistic / math.pi) * math.exp(-half)
    for k in range(1, (degrees + 1) // 2):
        total += term
        term *= statistic / (2 * k + 1)
    return min(1.0, total)


def sample_ratio_p_value(
    observed: Mapping[str, int], planned: Mapping[str, float]
) -> float:
    """Chi-square p-value of the units per arm against the planned split.

    `observed` must count independently assigned units: distinct users (or a uniform
    hash sample of them, see units.py), never requests, whose split of a few heavy
    users strays far beyond what the chi-square allows. An arm that receives traffic
    but has no planned share is a mismatch (p = 0).
    """
    total = sum(observed.values())
    weight_total = sum(weight for weight in planned.values() if weight > 0)
    if total == 0 or weight_total <= 0:
        return 1.0
    statistic = 0.0
    for arm in set(observed) | set(planned):
        expected = total * max(planned.get(arm, 0.0), 0.0) / weight_total
        count = observed.get(arm, 0)
        if expected == 0:
            if count > 0:
                return 0.0
            continue
        statistic += (count - expected) ** 2 / expected
    arms = sum(1 for weight in planned.values() if weight > 0)
    return chi_square_survival(statistic, max(arms - 1, 1))


@dataclass(frozen=True)
class ArmTotals:
    """What one arm of an experiment has seen so far."""

    arm: str
    variant: str = ""
    requests: int = 0
    errors: int = 0
    latency_count: int = 0
    latency_sum_s: float = 0.0
    latency_square_sum_s2: float = 0.0
    rated: int = 0
    positive: int = 0
    # Distinct assignment units (estimated; exact below the sample capacity), and
    # how many of them are in the experiment's uniform unit sample (what SRM tests).
    units: int = 0
    units_sampled: int = 0

    @property
    def positive_rate(self) -> float:
        return self.positive / self.rated if self.rated else 0.0

    @property
    def mean_latency_s(self) -> float:
        return self.latency_sum_s / self.latency_count if self.latency_count else 0.0

    @property
    def latency_variance_s2(self) -> float:
        if self.latency_count < 2:
            return 0.0
        mean = self.mean_latency_s
        square_mean = self.latency_square_sum_s2 / self.latency_count
        return max(square_mean - mean * mean, 0.0)


@dataclass(frozen=True)
class ExperimentPolicy:
    """When an experiment is decided; the analyzer's settings fill it in."""

    alpha: float = 0.05
    # tau^2 of the mixture over the positive-rate lift: the size of lift the test is
    # most sensitive to is about tau (0.1 = ten points).
    mixing_variance: float = 0.01
    min_rated_per_arm: int = 30
    max_rated_per_arm: int = 400
    min_requests_per_arm: int = 30
    error_rate_margin: float = 0.02
    error_rate_ceiling: float = 0.2
    error_mixing_variance: float = 0.0025
    latency_margin_ratio: float = 0.25
    srm_alpha: float = 0.001


@dataclass(frozen=True)
class Evaluation:
    """One look at an experiment: the decision, why, and the statistics behind it."""

    decision: Decision
    reason: str
    lift: SequentialEstimate
    srm_p_value: float


def estimate_lift(
    control: ArmTotals, treatment: ArmTotals, policy: ExperimentPolicy
) -> SequentialEstimate:
    """The positive-feedback-rate lift of treatment over control."""
    lift, p_value, low, high = proportion_lift(
        control.positive,
        control.rated,
        treatment.positive,
        treatment.rated,
        mixing_variance=policy.mixing_variance,
        alpha=policy.alpha,
    )
    return SequentialEstimate(float(lift), float(low), float(high), float(p_value))


def guardrail_breach(
    control: ArmTotals, treatment: ArmTotals, policy: ExperimentPolicy
) -> str | None:
    """Why the treatment breaks a guardrail (errors, latency), or None."""
    if min(control.requests, treatment.requests) < policy.min_requests_per_arm:
        return None
    _, _, error_low, _ = proportion_lift(
        control.errors,
        control.requests,
        treatment.errors,
        treatment.requests,
        mixing_variance=policy.error_mixing_variance,
        alpha=policy.alpha,
    )
    if error_low > policy.error_rate_margin:
        return (
            f"error-rate guardrail: treatment exceeds control by more than "
            f"{policy.error_rate_margin:.3f} (lower bound {float(error_low):+.3f})"
        )
    rate = smoothed_rate(treatment.errors, treatment.requests)
    _, ceiling_low, _ = mixture_test(
        treatment.errors / treatment.requests,
        rate * (1 - rate) / treatment.requests,
        policy.error_mixing_variance,
        policy.alpha,
        policy.error_rate_ceiling,
    )
    if ceiling_low > policy.error_rate_ceiling:
        return (
            f"error-rate guardrail: treatment error rate above the ceiling "
            f"{policy.error_rate_ceiling:.3f} (lower bound {float(ceiling_low):.3f})"
        )
    return _latency_breach(control, treatment, policy)


def _latency_breach(
    control: ArmTotals, treatment: ArmTotals, policy: ExperimentPolicy
) -> str | None:
    if min(control.latency_count, treatment.latency_count) < 2:
        return None
    margin_s = policy.latency_margin_ratio * control.mean_latency_s
    if margin_s <= 0:
        return None
    variance = (
        control.latency_variance_s2 / control.latency_count
        + treatment.latency_variance_s2 / treatment.latency_count
    )
    difference = treatment.mean_latency_s - control.mean_latency_s
    # The mixture is scaled to the margin, so the test is scale-free.
    _, low, _ = mixture_test(difference, variance, margin_s**2, policy.alpha)
    if low > margin_s:
        return (
            f"latency guardrail: treatment slower than control by more than "
            f"{policy.latency_margin_ratio:.0%} (lower bound {float(low):+.3f} s)"
        )
    return None


def evaluate(
    control: ArmTotals,
    treatment: ArmTotals,
    planned: Mapping[str, float] | None,
    policy: ExperimentPolicy,
) -> Evaluation:
    """Decide an experiment: guardrails first, then the primary metric.

    `planned` is the split the routing table intends (arm -> weight); None when it is
    not known yet, in which case the experiment is never promoted.

    The sample-ratio check compares the sampled distinct units per arm (not requests:
    the gateway assigns per user) with `planned`. A mismatch means the assignment or
    the logging is broken, so the lift cannot be trusted in either direction for a
    promotion: the experiment is held (never promoted) and, once it reaches
    `max_rated_per_arm`, rolled back like any other experiment without a usable
    result. Guardrail breaches and a significantly worse treatment still roll back
    at once, since rolling back is the safe side even on suspect data.
    """
    lift = estimate_lift(control, treatment, policy)
    observed = {
        control.arm: control.units_sampled,
        treatment.arm: treatment.units_sampled,
    }
    srm_p_value = 1.0 if planned is None else sample_ratio_p_value(observed, planned)

    def verdict(decision: Decision, reason: str) -> Evaluation:
        return Evaluation(decision, reason, lift, srm_p_value)

    breach = guardrail_breach(control, treatment, policy)
    if breach is not None:
        return verdict(Decision.ROLL_BACK, breach)
    rated = min(control.rated, treatment.rated)
    summary = f"lift {lift.estimate:+.3f} [{lift.low:+.3f}, {lift.high:+.3f}]"
    if rated < policy.min_rated_per_arm:
        return verdict(
            Decision.CONTINUE,
            f"collecting: {rated} of {policy.min_rated_per_arm} rated per arm",
        )
    if lift.below(0.0):
        return verdict(Decision.ROLL_BACK, f"mSPRT p={lift.p_value:.4f}, {summary}")
    at_cap = rated >= policy.max_rated_per_arm
    if srm_p_value < policy.srm_alpha:
        mismatch = f"sample ratio mismatch p={srm_p_value:.2g}"
        if at_cap:
            return verdict(
                Decision.ROLL_BACK,
                f"futility: {rated} rated per arm, {mismatch}: not promoting, "
                f"{summary}",
            )
        return verdict(Decision.CONTINUE, f"{mismatch}: not promoting, {summary}")
    if lift.above(0.0):
        if planned is None:
            return verdict(
                Decision.CONTINUE, f"planned split unknown: not promoting, {summary}"
            )
        return verdict(Decision.PROMOTE, f"mSPRT p={lift.p_value:.4f}, {summary}")
    if at_cap:
        return verdict(
            Decision.ROLL_BACK,
            f"futility: {rated} rated per arm without significance, {summary}",
        )
    return verdict(Decision.CONTINUE, f"mSPRT p={lift.p_value:.4f}, {summary}")
