"""The experiment statistics, checked by simulation with fixed seeds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from services.analyzer import stats
from services.analyzer.stats import ArmTotals, Decision, ExperimentPolicy

POLICY = ExperimentPolicy()
EXPERIMENTS = 1_000
MAX_PER_ARM = 400
BATCH = 10


def simulate_looks(
    control_rate: float, treatment_rate: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative lift tests after every batch: (lift, low, high), one row each."""
    rng = np.random.default_rng(seed)
    shape = (EXPERIMENTS, MAX_PER_ARM // BATCH)
    control = np.cumsum(rng.binomial(BATCH, control_rate, shape), axis=1)
    treatment = np.cumsum(rng.binomial(BATCH, treatment_rate, shape), axis=1)
    trials = np.arange(1, shape[1] + 1) * BATCH
    lift, _, low, high = stats.proportion_lift(
        control,
        trials,
        treatment,
        trials,
        mixing_variance=POLICY.mixing_variance,
        alpha=POLICY.alpha,
    )
    return lift, low, high


@pytest.mark.parametrize(("rate", "seed"), [(0.5, 1), (0.4, 2), (0.1, 3)])
def test_a_a_experiments_declare_a_difference_at_most_alpha(
    rate: float, seed: int
) -> None:
    _, low, high = simulate_looks(rate, rate, seed)

    ever_declared = ((low > 0) | (high < 0)).any(axis=1)

    share = ever_declared.mean()
    print(f"A/A rate={rate}: share ever declaring a difference {share:.3f}")
    assert share <= POLICY.alpha


def test_real_lift_is_detected_with_high_power() -> None:
    _, low, _ = simulate_looks(0.4, 0.6, seed=4)

    promoted = low > 0
    detected = promoted.any(axis=1)
    first_look = np.argmax(promoted, axis=1)[detected]
    samples_to_decision = (first_look + 1) * BATCH

    power = detected.mean()
    median = float(np.median(samples_to_decision))
    print(f"A/B 0.4->0.6: power {power:.3f}, median {median:.0f} rated per arm")
    assert power >= 0.95
    assert median < MAX_PER_ARM


@pytest.mark.parametrize(
    ("control_rate", "treatment_rate", "seed", "min_power"),
    [
        # A small lift is rarely found within the cap, but more often than A/A.
        (0.40, 0.45, 11, 0.08),
        (0.40, 0.50, 12, 0.45),
        (0.40, 0.60, 13, 0.95),
        (0.10, 0.20, 14, 0.8),
        (0.70, 0.85, 15, 0.95),
    ],
)
def test_power_and_time_to_decision_by_lift(
    control_rate: float, treatment_rate: float, seed: int, min_power: float
) -> None:
    """The power table: share of 1,000 A/B experiments promoted within the cap of
    400 rated per arm, and how many ratings per arm it took (looks every 10)."""
    _, low, _ = simulate_looks(control_rate, treatment_rate, seed)

    promoted = low > 0
    detected = promoted.any(axis=1)
    looks = (np.argmax(promoted, axis=1)[detected] + 1) * BATCH
    power = detected.mean()
    median, p90 = (
        (float(np.median(looks)), float(np.quantile(looks, 0.9)))
        if looks.size
        else (math.nan, math.nan)
    )

    print(
        f"power {control_rate:.2f}->{treatment_rate:.2f}: {power:.3f}, rated per arm "
        f"to decision median {median:.0f}, p90 {p90:.0f}"
    )
    assert power >= min_power


def continuous_looks(
    control_mean: float, treatment_mean: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Always-valid intervals for a difference of means (latency-like lognormal
    values, each arm's mean as given), after every batch: (low, high)."""
    rng = np.random.default_rng(seed)
    shape = (EXPERIMENTS, MAX_PER_ARM // BATCH, BATCH)
    sigma = 0.5
    bounds = []
    for mean in (control_mean, treatment_mean):
        values = rng.lognormal(math.log(mean) - sigma**2 / 2, sigma, shape)
        count = np.arange(1, shape[1] + 1) * BATCH
        total = np.cumsum(values.sum(axis=2), axis=1)
        squares = np.cumsum((values**2).sum(axis=2), axis=1)
        arm_mean = total / count
        bounds.append((arm_mean, (squares / count - arm_mean**2) / count))
    (control, control_var), (treatment, treatment_var) = bounds
    # Scale-free mixture, as the latency guardrail sets it: (a quarter of the mean)^2.
    _, low, high = stats.mixture_test(
        treatment - control,
        control_var + treatment_var,
        (0.25 * control_mean) ** 2,
        POLICY.alpha,
    )
    return low, high


def test_a_a_continuous_metric_declares_a_difference_at_most_alpha() -> None:
    low, high = continuous_looks(1.0, 1.0, seed=21)

    share = ((low > 0) | (high < 0)).any(axis=1).mean()

    print(f"A/A latency-like metric: share ever declaring a difference {share:.3f}")
    assert share <= POLICY.alpha


def test_a_b_continuous_metric_detects_a_slower_treatment() -> None:
    low, _ = continuous_looks(1.0, 1.3, seed=22)

    detected = (low > 0).any(axis=1)

    print(f"A/B latency-like metric, 30% slower: power {detected.mean():.3f}")
    assert detected.mean() >= 0.9


def test_worse_treatment_is_never_declared_better() -> None:
    _, low, high = simulate_looks(0.6, 0.4, seed=5)

    assert not (low > 0).any()
    assert (high < 0).any(axis=1).mean() >= 0.95


def test_srm_fires_on_a_52_48_split_of_10000_at_a_planned_50_50() -> None:
    p_value = stats.sample_ratio_p_value(
        {"control": 5_200, "treatment": 4_800}, {"control": 5_000, "treatment": 5_000}
    )

    assert p_value < POLICY.srm_alpha


def test_srm_is_quiet_on_an_exact_50_50_split() -> None:
    p_value = stats.sample_ratio_p_value(
        {"control": 5_000, "treatment": 5_000}, {"control": 5_000, "treatment": 5_000}
    )

    assert p_value == pytest.approx(1.0)


def test_srm_respects_an_unequal_planned_split() -> None:
    planned = {"treatment": 500, "control": 9_500}

    assert stats.sample_ratio_p_value({"treatment": 50, "control": 950}, planned) > 0.5
    assert (
        stats.sample_ratio_p_value({"treatment": 500, "control": 500}, planned) < 1e-9
    )


def test_srm_on_traffic_to_an_unplanned_arm_is_a_mismatch() -> None:
    p_value = stats.sample_ratio_p_value(
        {"control": 10, "other": 1}, {"control": 1, "treatment": 1}
    )

    assert p_value == 0.0


@pytest.mark.parametrize(
    ("statistic", "degrees", "expected"),
    [
        (3.841458820694124, 1, 0.05),
        (5.991464547107979, 2, 0.05),
        (7.814727903251178, 3, 0.05),
        (13.276704135987622, 4, 0.01),
        (20.515005652432873, 5, 0.001),
    ],
)
def test_chi_square_survival_matches_tables(
    statistic: float, degrees: int, expected: float
) -> None:
    assert stats.chi_square_survival(statistic, degrees) == pytest.approx(
        expected, rel=1e-6
    )


def arms(
    control_rated: int,
    control_positive: int,
    treatment_rated: int,
    treatment_positive: int,
    **treatment_overrides: float,
) -> tuple[ArmTotals, ArmTotals]:
    requests = max(control_rated, treatment_rated, 100)
    control = ArmTotals(
        arm="control",
        requests=requests,
        latency_count=requests,
        latency_sum_s=requests * 1.0,
        latency_square_sum_s2=requests * 1.01,
        rated=control_rated,
        positive=control_positive,
        units=requests,
        units_sampled=requests,
    )
    treatment_fields = {
        "arm": "treatment",
        "requests": requests,
        "latency_count": requests,
        "latency_sum_s": requests * 1.0,
        "latency_square_sum_s2": requests * 1.01,
        "rated": treatment_rated,
        "positive": treatment_positive,
        "units": requests,
        "units_sampled": requests,
        **treatment_overrides,
    }
    return control, ArmTotals(**treatment_fields)  # type: ignore[arg-type]


PLANNED = {"control": 5_000, "treatment": 5_000}


def test_clear_lift_is_promoted() -> None:
    control, treatment = arms(200, 80, 200, 130)

    result = stats.evaluate(control, treatment, PLANNED, POLICY)

    assert result.decision is Decision.PROMOTE
    assert result.lift.estimate == pytest.approx(0.25)
    assert 0 < result.lift.low < 0.25 < result.lift.high
    assert result.lift.p_value <= POLICY.alpha


def test_clear_loss_is_rolled_back() -> None:
    control, treatment = arms(200, 130, 200, 80)

    result = stats.evaluate(control, treatment, PLANNED, POLICY)

    assert result.decision is Decision.ROLL_BACK
    assert result.lift.high < 0


def test_too_few_ratings_continue() -> None:
    control, treatment = arms(10, 1, 10, 10)

    result = stats.evaluate(control, treatment, PLANNED, POLICY)

    assert result.decision is Decision.CONTINUE
    assert "collecting" in result.reason


def test_futility_rolls_back_at_the_rating_cap() -> None:
    control, treatment = arms(400, 200, 400, 204)

    result = stats.evaluate(control, treatment, PLANNED, POLICY)

    assert result.decision is Decision.ROLL_BACK
    assert "futility" in result.reason


def test_error_guardrail_rolls_back_before_the_primary_decides() -> None:
    control, treatment = arms(5, 2, 5, 2, errors=40)

    result = stats.evaluate(control, treatment, PLANNED, POLICY)

    assert result.decision is Decision.ROLL_BACK
    assert "error-rate guardrail" in result.reason


def test_latency_guardrail_rolls_back_a_much_slower_treatment() -> None:
    control, treatment = arms(
        5, 2, 5, 2, latency_sum_s=300.0, latency_square_sum_s2=100 * 9.1
    )

    result = stats.evaluate(control, treatment, PLANNED, POLICY)

    assert result.decision is Decision.ROLL_BACK
    assert "latency guardrail" in result.reason


def test_sample_ratio_mismatch_blocks_a_promotion() -> None:
    control, treatment = arms(200, 80, 200, 130, units_sampled=300)

    result = stats.evaluate(control, treatment, PLANNED, POLICY)

    assert result.srm_p_value < POLICY.srm_alpha
    assert result.decision is Decision.CONTINUE
    assert "sample ratio mismatch" in result.reason


def test_unknown_planned_split_blocks_a_promotion() -> None:
    control, treatment = arms(200, 80, 200, 130)

    result = stats.evaluate(control, treatment, None, POLICY)

    assert result.decision is Decision.CONTINUE
    assert math.isclose(result.srm_p_value, 1.0)


def test_sample_ratio_mismatch_at_the_rating_cap_rolls_back() -> None:
    control, treatment = arms(400, 160, 400, 260, units_sampled=300)

    result = stats.evaluate(control, treatment, PLANNED, POLICY)

    assert result.srm_p_value < POLICY.srm_alpha
    assert result.decision is Decision.ROLL_BACK
    assert "futility" in result.reason
    assert "sample ratio mismatch" in result.reason


def test_a_skewed_request_split_alone_is_no_mismatch() -> None:
    control, treatment = arms(200, 80, 200, 130, requests=1_000)

    result = stats.evaluate(control, treatment, PLANNED, POLICY)

    assert result.srm_p_value == pytest.approx(1.0)
    assert result.decision is Decision.PROMOTE
