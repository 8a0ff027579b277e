"""The analyzer's Prometheus metrics: one collector reading a snapshot of its tables.

The HTTP server (services/common/probes.py, beside /livez and /readyz) runs in a
thread; the snapshot is taken on the event loop (the tables
are not thread-safe) and handed over, so a scrape always sees consistent numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from services.analyzer.stats import Decision

PREFIX = "flywheel_analyzer"
VARIANT_LABELS = ["route", "variant", "arm"]
EXPERIMENT_LABELS = ["route", "experiment"]


@dataclass(frozen=True)
class ArmGauges:
    """One arm's sample sizes in the latest evaluation of its experiment."""

    arm: str
    requests: int
    rated: int
    # Estimated distinct assignment units (users), exact below the sample capacity.
    units: int


@dataclass(frozen=True)
class ExperimentGauges:
    """The latest evaluation of one experiment, as the metrics show it."""

    route: str
    experiment_id: str
    decision: Decision
    lift: float
    lift_low: float
    lift_high: float
    p_value: float
    srm_p_value: float
    arms: tuple[ArmGauges, ...] = ()


@dataclass(frozen=True)
class MetricsSnapshot:
    """Everything a scrape shows, summed over the partitions this worker owns."""

    # (route, variant, arm) -> KPI counters
    variants: Mapping[tuple[str, str, str], Mapping[str, float]] = field(
        default_factory=dict
    )
    # (topic, reason) -> count of events skipped (invalid, duplicate, orphan)
    skipped: Mapping[tuple[str, str], float] = field(default_factory=dict)
    experiments: tuple[ExperimentGauges, ...] = ()


class AnalyzerCollector(Collector):
    """Turns the latest snapshot into metric families at every scrape."""

    def __init__(self, read_snapshot: Callable[[], MetricsSnapshot]) -> None:
        self._read_snapshot = read_snapshot

    def collect(self) -> Iterator[Metric]:
        snapshot = self._read_snapshot()
        yield from _variant_families(snapshot.variants)
        skipped = CounterMetricFamily(
            f"{PREFIX}_events_skipped",
            "Input events not counted: invalid, duplicate, or orphaned feedback.",
            labels=["topic", "reason"],
        )
        for (topic, reason), value in sorted(snapshot.skipped.items()):
            skipped.add_metric([topic, reason], value)
        yield skipped
        yield from _experiment_families(snapshot.experiments)


_COUNTERS = (
    ("requests", "requests", "Interactions served."),
    ("errors", "errors", "Interactions that ended in an error."),
    ("cost_usd", "cost_usd", "Cost of the interactions in US dollars."),
    ("feedback", "feedback", "Feedback events given (engagement)."),
    ("rated", "rated", "Feedback events that rate the answer."),
    ("positive", "positive_feedback", "Ratings that are positive."),
    ("corrections", "corrections", "Corrections (preferred answers) given."),
)


def _variant_families(
    variants: Mapping[tuple[str, str, str], Mapping[str, float]],
) -> Iterator[Metric]:
    rows = sorted(variants.items())
    for field_name, metric_name, documentation in _COUNTERS:
        family = CounterMetricFamily(
            f"{PREFIX}_{metric_name}", documentation, labels=VARIANT_LABELS
        )
        for labels, counts in rows:
            family.add_metric(list(labels), counts.get(field_name, 0))
        yield family
    latency = SummaryMetricFamily(
        f"{PREFIX}_latency_seconds", "Total latency.", labels=VARIANT_LABELS
    )
    ttft = SummaryMetricFamily(
        f"{PREFIX}_ttft_seconds", "Time to first token.", labels=VARIANT_LABELS
    )
    tokens = CounterMetricFamily(
        f"{PREFIX}_tokens", "Tokens used.", labels=[*VARIANT_LABELS, "kind"]
    )
    ratio = GaugeMetricFamily(
        f"{PREFIX}_positive_feedback_ratio",
        "Share of ratings that are positive (accuracy proxy).",
        labels=VARIANT_LABELS,
    )
    for labels, counts in rows:
        values = list(labels)
        latency.add_metric(
            values,
            int(counts.get("latency_count", 0)),
            counts.get("latency_sum_s", 0),
        )
        ttft.add_metric(
            values, int(counts.get("ttft_count", 0)), counts.get("ttft_sum_s", 0)
        )
        tokens.add_metric([*values, "prompt"], counts.get("prompt_tokens", 0))
        tokens.add_metric([*values, "completion"], counts.get("completion_tokens", 0))
        if counts.get("rated", 0) > 0:
            ratio.add_metric(values, counts.get("positive", 0) / counts["rated"])
    yield from (latency, ttft, tokens, ratio)


_EXPERIMENT_GAUGES = (
    ("lift", "lift", "Positive-rate lift, treatment minus control."),
    ("lift_low", "lift_low", "Always-valid confidence interval, lower end."),
    ("lift_high", "lift_high", "Always-valid confidence interval, upper end."),
    ("p_value", "p_value", "Always-valid p-value of the lift (mSPRT)."),
    ("srm_p_value", "srm_p_value", "Sample-ratio-mismatch p-value (chi-square)."),
)


def _experiment_families(experiments: tuple[ExperimentGauges, ...]) -> Iterator[Metric]:
    for attribute, metric_name, documentation in _EXPERIMENT_GAUGES:
        family = GaugeMetricFamily(
            f"{PREFIX}_experiment_{metric_name}",
            documentation,
            labels=EXPERIMENT_LABELS,
        )
        for gauges in experiments:
            family.add_metric(
                [gauges.route, gauges.experiment_id], getattr(gauges, attribute)
            )
        yield family
    decision = GaugeMetricFamily(
        f"{PREFIX}_experiment_decision",
        "The latest decision: 1 for the current one, 0 for the others.",
        labels=[*EXPERIMENT_LABELS, "decision"],
    )
    for gauges in experiments:
        for choice in Decision:
            decision.add_metric(
                [gauges.route, gauges.experiment_id, choice.value],
                1.0 if choice is gauges.decision else 0.0,
            )
    yield decision
    yield from _arm_families(experiments)


_ARM_GAUGES = (
    ("requests", "Requests served by the arm in this experiment."),
    ("rated", "Rated interactions of the arm (one rating each) in this experiment."),
    ("units", "Distinct assignment units (users) of the arm, estimated."),
)


def _arm_families(experiments: tuple[ExperimentGauges, ...]) -> Iterator[Metric]:
    for attribute, documentation in _ARM_GAUGES:
        family = GaugeMetricFamily(
            f"{PREFIX}_experiment_arm_{attribute}",
            documentation,
            labels=[*EXPERIMENT_LABELS, "arm"],
        )
        for gauges in experiments:
            for arm in gauges.arms:
                family.add_metric(
                    [gauges.route, gauges.experiment_id, arm.arm],
                    getattr(arm, attribute),
                )
        yield family


def analyzer_registry(
    read_snapshot: Callable[[], MetricsSnapshot],
) -> CollectorRegistry:
    """The registry /metrics serves: the analyzer's collector alone."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AnalyzerCollector(read_snapshot))
    return registry
