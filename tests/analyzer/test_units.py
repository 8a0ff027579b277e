"""Distinct assignment units: the unit rule, the bounded sample, and SRM on units."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest

from services.analyzer import handlers, stats, units
from services.analyzer.stats import Decision, ExperimentPolicy
from services.analyzer.units import UnitCounts
from services.common.events import ChatMessage, Interaction
from services.common.routing import Route, Variant, bucket_of

POLICY = ExperimentPolicy()
PLANNED = {"control": 5_000, "treatment": 5_000}


def interaction(**fields: object) -> Interaction:
    now = datetime.now(UTC)
    defaults: dict[str, object] = {
        "project_id": "p",
        "route": "bot",
        "variant": "base",
        "request_messages": [ChatMessage(role="user", content="hi")],
        "latency_s": 0.5,
        "started_at": now,
        "finished_at": now,
    }
    return Interaction.model_validate({**defaults, **fields})


def fill(
    ids: range | list[str], *, capacity: int, experiment: str = "e", arm: str = "a"
) -> tuple[dict[str, Any], UnitCounts]:
    members: dict[str, Any] = {}
    counts = UnitCounts()
    for unit in ids:
        counts = units.add_unit(
            members, counts, experiment, arm, units.unit_hash(f"user:{unit}"), capacity
        )
    return members, counts


def test_the_unit_is_the_user_else_the_session_else_the_request() -> None:
    with_user = interaction(user_id="u1", session_id="s1")
    with_session = interaction(session_id="s1")
    anonymous = interaction()

    assert units.unit_of(with_user) == "user:u1"
    assert units.unit_of(with_session) == "session:s1"
    assert units.unit_of(anonymous) == f"request:{anonymous.interaction_id}"


def test_a_unit_seen_again_is_counted_once() -> None:
    members, counts = fill([*range(10), *range(10), *range(5)], capacity=100)

    assert counts == UnitCounts(0, {"a": 10})
    assert counts.exact
    assert len(members) == 10


def test_the_count_is_exact_up_to_the_capacity() -> None:
    _, counts = fill(range(10_000), capacity=50_000)

    assert counts.exact
    assert counts.estimate("a") == 10_000


@pytest.mark.parametrize(
    ("distinct", "capacity", "tolerance"),
    [
        (10_000, 4_096, 0.05),
        (100_000, 4_096, 0.05),
        (100_000, 50_000, 0.02),
    ],
)
def test_the_sampled_estimate_is_within_a_few_percent(
    distinct: int, capacity: int, tolerance: float
) -> None:
    members, counts = fill(range(distinct), capacity=capacity)

    error = counts.estimate("a") / distinct - 1
    print(f"{distinct} ids, capacity {capacity}: level {counts.level}, {error:+.4f}")
    assert counts.level > 0
    assert capacity // 2 <= counts.total <= capacity
    assert len(members) == counts.total
    assert abs(error) <= tolerance


def test_merging_two_samples_estimates_their_union() -> None:
    capacity = 4_096
    _, whole = fill(range(30_000), capacity=capacity)
    left, left_counts = fill(range(0, 20_000), capacity=capacity)
    right, right_counts = fill(range(10_000, 30_000), capacity=capacity)

    other = [units.split_member_key(key)[1:] for key in right]
    merged = units.merge_into(
        left, left_counts, "e", other, right_counts.level, capacity
    )

    assert merged == whole
    assert len(left) == whole.total


def test_resampling_leaves_other_experiments_alone() -> None:
    members, _ = fill(range(50), capacity=1_000, experiment="other")
    counts = UnitCounts()
    for unit in range(200):
        counts = units.add_unit(
            members, counts, "e", "a", units.unit_hash(f"user:{unit}"), 64
        )

    others = [key for key in members if units.split_member_key(key)[0] == "other"]
    assert len(others) == 50
    assert counts.level > 0
    assert units.drop_experiments(members, {"e"}) == counts.total
    assert len(members) == 50


ROUTE = Route(
    name="bot",
    experiment_id="e",
    variants=(
        Variant("cand", "http://127.0.0.1:1", "m", 5_000, arm="treatment"),
        Variant("base", "http://127.0.0.1:1", "m", 5_000, arm="control"),
    ),
)


def fold(observations: list[dict[str, Any]], capacity: int = 50_000) -> Any:
    members: dict[str, Any] = {}
    value: dict[str, Any] | None = None
    for observation in observations:
        value = handlers.apply_observation(value, observation, partition=0)
        value = handlers.count_unit(value, observation, members, capacity)
    return value


def with_ratings(totals: stats.ArmTotals, rated: int, positive: int) -> Any:
    return dataclasses.replace(totals, rated=rated, positive=positive)


def test_many_requests_from_few_users_do_not_fire_srm() -> None:
    # Ten users; the first sends ten times as many requests as each of the others,
    # so the arm that holds it gets far more requests than the split planned.
    users = [f"user-{i}" for i in range(10)]
    requests = [
        user for i, user in enumerate(users) for _ in range(1_000 if i == 0 else 100)
    ]
    observations = []
    for user in requests:
        variant = ROUTE.assign(bucket_of(ROUTE.name, str(user)))
        event = interaction(
            user_id=str(user), variant=variant.name, arm=variant.arm, experiment_id="e"
        )
        observations.append(handlers.request_observation(event))

    value = fold(observations)
    control, treatment = (handlers.arm_totals(value, arm) for arm in PLANNED)
    by_requests = stats.sample_ratio_p_value(
        {"control": control.requests, "treatment": treatment.requests}, PLANNED
    )
    result = stats.evaluate(
        with_ratings(control, 200, 80),
        with_ratings(treatment, 200, 130),
        PLANNED,
        POLICY,
    )

    print(f"requests {control.requests}/{treatment.requests}, p={by_requests:.2g}")
    assert control.units + treatment.units == 10
    assert by_requests < POLICY.srm_alpha  # what the request-level check did
    assert result.srm_p_value >= POLICY.srm_alpha
    assert result.decision is Decision.PROMOTE


def test_a_52_48_split_of_10000_users_fires_srm() -> None:
    rng = np.random.default_rng(8)
    observations = []
    for user in range(10_000):
        arm = "control" if user < 5_200 else "treatment"
        unit = units.unit_hash(f"user:{user}")
        for _ in range(int(rng.integers(1, 4))):
            observations.append(
                {
                    "experiment_id": "e",
                    "route": "bot",
                    "arm": arm,
                    "variant": arm,
                    "kind": "request",
                    "error": False,
                    "latency_s": 0.5,
                    "unit": unit,
                }
            )

    value = fold(observations)
    control, treatment = (handlers.arm_totals(value, arm) for arm in PLANNED)
    result = stats.evaluate(
        with_ratings(control, 200, 80),
        with_ratings(treatment, 200, 130),
        PLANNED,
        POLICY,
    )

    assert (control.units, treatment.units) == (5_200, 4_800)
    assert result.srm_p_value < POLICY.srm_alpha
    assert result.decision is Decision.CONTINUE
    assert "sample ratio mismatch" in result.reason


def test_srm_on_few_users_fires_at_most_alpha_under_the_planned_split() -> None:
    rng = np.random.default_rng(9)
    users = rng.integers(5, 60, size=5_000)
    treatment = rng.binomial(users, 0.5)

    fired = [
        stats.sample_ratio_p_value(
            {"control": int(n - t), "treatment": int(t)}, PLANNED
        )
        < POLICY.srm_alpha
        for n, t in zip(users, treatment, strict=True)
    ]

    assert np.mean(fired) <= POLICY.srm_alpha * 2
