"""Pure processing for the analyzer: parse events, count them, fold observations.

No Kafka or faust here. Table values are plain JSON-able dicts, always replaced by a
new dict (never mutated in place), because faust only writes a table's changelog on
assignment.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any, TypeVar

from pydantic import ValidationError

from services.analyzer import units
from services.analyzer.errors import InvalidEventError
from services.analyzer.stats import ArmTotals
from services.common.events import (
    FEEDBACK_SCHEMA_VERSION,
    INTERACTION_SCHEMA_VERSION,
    Feedback,
    FeedbackKind,
    Interaction,
)
from services.common.routing import RoutingTable

Counts = dict[str, float]
EventT = TypeVar("EventT", Interaction, Feedback)

# The KPI counters kept per (route, variant, arm, source partition).
KPI_FIELDS = (
    "requests",
    "errors",
    "latency_sum_s",
    "latency_count",
    "ttft_sum_s",
    "ttft_count",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
    "feedback",
    "rated",
    "positive",
    "corrections",
)
ARM_FIELDS = (
    "requests",
    "errors",
    "latency_count",
    "latency_sum_s",
    "latency_square_sum_s2",
    "rated",
    "positive",
    # Distinct assignment units in the experiment's unit sample (see units.py).
    "units_sampled",
)


def parse_interaction(raw: bytes | None) -> Interaction:
    """The interaction in `raw`, or InvalidEventError with the reason."""
    event = _parse(Interaction, raw)
    if event.schema_version > INTERACTION_SCHEMA_VERSION:
        raise InvalidEventError(
            "unsupported_schema_version", f"interaction v{event.schema_version}"
        )
    return event


def parse_feedback(raw: bytes | None) -> Feedback:
    """The feedback in `raw`, or InvalidEventError with the reason."""
    event = _parse(Feedback, raw)
    if event.schema_version > FEEDBACK_SCHEMA_VERSION:
        raise InvalidEventError(
            "unsupported_schema_version", f"feedback v{event.schema_version}"
        )
    return event


def _parse(model: type[EventT], raw: bytes | None) -> EventT:
    if raw is None:
        raise InvalidEventError("invalid", "empty message")
    try:
        return model.model_validate_json(raw)
    except ValidationError as error:
        raise InvalidEventError(
            "invalid", f"{error.error_count()} validation errors"
        ) from error


def kpi_key(route: str, variant: str, arm: str, partition: int) -> str:
    """A counter key that lives in exactly one partition (the source partition)."""
    return json.dumps([route, variant, arm, partition])


def split_kpi_key(key: str) -> tuple[str, str, str, int]:
    route, variant, arm, partition = json.loads(key)
    return str(route), str(variant), str(arm), int(partition)


def skip_key(topic: str, reason: str, partition: int) -> str:
    """A key of the skipped-events counters (invalid, duplicate, orphan)."""
    return json.dumps([topic, reason, partition])


def split_skip_key(key: str) -> tuple[str, str, int]:
    topic, reason, partition = json.loads(key)
    return str(topic), str(reason), int(partition)


def add_counts(current: Mapping[str, float] | None, increments: Counts) -> Counts:
    """A new counter dict: `current` plus `increments`."""
    merged = dict(current or {})
    for name, value in increments.items():
        merged[name] = merged.get(name, 0) + value
    return merged


def interaction_counts(interaction: Interaction) -> Counts:
    """What one interaction adds to its variant's KPI counters."""
    counts: Counts = {
        "requests": 1,
        "errors": 1 if interaction.error is not None else 0,
        "latency_sum_s": interaction.latency_s,
        "latency_count": 1,
        "prompt_tokens": interaction.usage.prompt_tokens,
        "completion_tokens": interaction.usage.completion_tokens,
        "cost_usd": interaction.cost_usd,
    }
    if interaction.time_to_first_token_s is not None:
        counts["ttft_sum_s"] = interaction.time_to_first_token_s
        counts["ttft_count"] = 1
    return counts


def feedback_counts(feedback: Feedback) -> Counts:
    """What one feedback event adds to its interaction's variant's KPI counters."""
    positive = feedback.is_positive()
    return {
        "feedback": 1,
        "rated": 0 if positive is None else 1,
        "positive": 1 if positive else 0,
        "corrections": 1 if feedback.kind is FeedbackKind.CORRECTION else 0,
    }


def join_entry(
    interaction: Interaction, partition: int, now_s: float
) -> dict[str, Any]:
    """What the join table keeps of an interaction for its feedback to find."""
    return {
        "project_id": interaction.project_id,
        "route": interaction.route,
        "variant": interaction.variant,
        "arm": interaction.arm or "",
        "experiment_id": interaction.experiment_id or "",
        "partition": partition,
        "seen_at": now_s,
        "feedback_ids": [],
        "rated": False,
    }


def from_other_project(entry: Mapping[str, Any], feedback: Feedback) -> bool:
    """Feedback naming another project's interaction: never counted against it.

    (The gateway refuses it when it remembers the interaction; producers writing to
    Kafka directly, or a gateway that forgot the id, can still send it.) Entries
    written before the project was kept have none and are not checked.
    """
    project = entry.get("project_id")
    return project is not None and project != feedback.project_id


def with_feedback(entry: Mapping[str, Any], feedback: Feedback) -> dict[str, Any]:
    """The join entry after `feedback` was counted against it."""
    return {
        **entry,
        "feedback_ids": [*entry["feedback_ids"], str(feedback.event_id)],
        "rated": entry["rated"] or feedback.is_positive() is not None,
    }


def with_pending(
    entry: Mapping[str, Any] | None, raw: bytes, partition: int, now_s: float
) -> dict[str, Any]:
    """The pending entry of an interaction after one more early feedback arrived."""
    base = entry or {"partition": partition, "seen_at": now_s, "feedback": []}
    return {**base, "feedback": [*base["feedback"], raw.decode()]}


def expired_keys(
    items: Iterable[tuple[str, Mapping[str, Any]]],
    partition: int,
    cutoff_s: float,
) -> list[str]:
    """Keys of `partition` last seen before `cutoff_s`."""
    return [
        key
        for key, entry in items
        if entry is not None
        and entry.get("partition") == partition
        and entry.get("seen_at", 0) < cutoff_s
    ]


def request_observation(interaction: Interaction) -> dict[str, Any]:
    """A small per-arm record of one request, sent keyed by experiment id."""
    return {
        "experiment_id": interaction.experiment_id,
        "route": interaction.route,
        "arm": interaction.arm or "",
        "variant": interaction.variant,
        "kind": "request",
        "error": interaction.error is not None,
        "latency_s": interaction.latency_s,
        # The hash of the assignment unit (user, else session, else this request).
        "unit": units.unit_hash(units.unit_of(interaction)),
    }


def rating_observation(entry: Mapping[str, Any], positive: bool) -> dict[str, Any]:
    """A small per-arm record of an interaction's first rating."""
    return {
        "experiment_id": entry["experiment_id"],
        "route": entry["route"],
        "arm": entry["arm"],
        "variant": entry["variant"],
        "kind": "rating",
        "positive": positive,
    }


def apply_observation(
    current: Mapping[str, Any] | None, observation: Mapping[str, Any], partition: int
) -> dict[str, Any]:
    """An experiment's per-arm totals after one more observation."""
    arms = dict((current or {}).get("arms", {}))
    arm = dict(arms.get(observation["arm"], dict.fromkeys(ARM_FIELDS, 0)))
    arm["variant"] = observation["variant"]
    if observation["kind"] == "request":
        latency_s = float(observation["latency_s"])
        arm["requests"] += 1
        arm["errors"] += 1 if observation["error"] else 0
        arm["latency_count"] += 1
        arm["latency_sum_s"] += latency_s
        arm["latency_square_sum_s2"] += latency_s * latency_s
    else:
        arm["rated"] += 1
        arm["positive"] += 1 if observation["positive"] else 0
    arms[observation["arm"]] = arm
    return {
        **(current or {}),
        "route": observation["route"],
        "partition": partition,
        "arms": arms,
    }


def unit_counts(value: Mapping[str, Any]) -> units.UnitCounts:
    """The sampled distinct units per arm of an `experiment_arms` table value."""
    sampled = {
        arm: int(fields.get("units_sampled", 0))
        for arm, fields in value.get("arms", {}).items()
    }
    return units.UnitCounts(int(value.get("unit_level", 0)), sampled)


def with_unit_counts(
    value: Mapping[str, Any], counts: units.UnitCounts
) -> dict[str, Any]:
    """A new table value carrying `counts` (arms not in it count zero units)."""
    arms = {
        arm: {**fields, "units_sampled": counts.sampled.get(arm, 0)}
        for arm, fields in value.get("arms", {}).items()
    }
    # A unit arriving after its ended experiment was swept makes it sweepable again.
    return {**value, "arms": arms, "unit_level": counts.level, "units_swept": False}


def count_unit(
    value: dict[str, Any],
    observation: Mapping[str, Any],
    members: MutableMapping[str, Any],
    capacity: int,
) -> dict[str, Any]:
    """The table value after counting a request observation's unit (if it has one).

    Observations from before units were carried have none; they count no unit.
    """
    if observation["kind"] != "request" or not observation.get("unit"):
        return value
    before = unit_counts(value)
    after = units.add_unit(
        members,
        before,
        observation["experiment_id"],
        observation["arm"],
        observation["unit"],
        capacity,
    )
    return value if after == before else with_unit_counts(value, after)


def arm_totals(value: Mapping[str, Any], arm: str) -> ArmTotals:
    """One arm's totals from an `experiment_arms` table value (zeros when unseen)."""
    fields = value.get("arms", {}).get(arm)
    if fields is None:
        return ArmTotals(arm=arm)
    return ArmTotals(
        arm=arm,
        variant=str(fields.get("variant", "")),
        requests=int(fields["requests"]),
        errors=int(fields["errors"]),
        latency_count=int(fields["latency_count"]),
        latency_sum_s=float(fields["latency_sum_s"]),
        latency_square_sum_s2=float(fields["latency_square_sum_s2"]),
        rated=int(fields["rated"]),
        positive=int(fields["positive"]),
        units=int(fields.get("units_sampled", 0)) << int(value.get("unit_level", 0)),
        units_sampled=int(fields.get("units_sampled", 0)),
    )


def planned_split(
    table: RoutingTable, route_name: str, experiment_id: str
) -> tuple[bool, dict[str, float] | None]:
    """(live, planned arm weights) of an experiment according to the routing table.

    Before the first table arrives the experiment counts as live with an unknown
    split (None); afterwards it is live only while its route still names it.
    """
    if table.version == 0:
        return True, None
    route = table.routes.get(route_name)
    if route is None or route.experiment_id != experiment_id:
        return False, None
    planned: dict[str, float] = {}
    for variant in route.variants:
        if variant.arm:
            planned[variant.arm] = planned.get(variant.arm, 0) + variant.weight_buckets
    return True, planned
