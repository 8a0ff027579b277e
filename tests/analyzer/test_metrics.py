"""The analyzer's Prometheus exposition, rendered from a snapshot."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from services.analyzer.metrics import (
    AnalyzerCollector,
    ArmGauges,
    ExperimentGauges,
    MetricsSnapshot,
)
from services.analyzer.stats import Decision


def scrape(
    snapshot: MetricsSnapshot,
) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AnalyzerCollector(lambda: snapshot))
    text = generate_latest(registry).decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


LABELS = {"route": "bot", "variant": "v1", "arm": "control"}


def key(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return name, frozenset(labels.items())


def test_variant_counters_are_exposed_with_prometheus_names() -> None:
    snapshot = MetricsSnapshot(
        variants={
            ("bot", "v1", "control"): {
                "requests": 4,
                "errors": 1,
                "latency_sum_s": 2.0,
                "latency_count": 4,
                "ttft_sum_s": 0.4,
                "ttft_count": 4,
                "prompt_tokens": 40,
                "completion_tokens": 8,
                "cost_usd": 0.5,
                "feedback": 3,
                "rated": 2,
                "positive": 1,
                "corrections": 1,
            }
        },
        skipped={("feedback", "orphan"): 2},
    )

    samples = scrape(snapshot)

    assert samples[key("flywheel_analyzer_requests_total", **LABELS)] == 4
    assert samples[key("flywheel_analyzer_errors_total", **LABELS)] == 1
    assert samples[key("flywheel_analyzer_latency_seconds_sum", **LABELS)] == 2.0
    assert samples[key("flywheel_analyzer_latency_seconds_count", **LABELS)] == 4
    assert samples[key("flywheel_analyzer_ttft_seconds_sum", **LABELS)] == 0.4
    assert samples[key("flywheel_analyzer_tokens_total", **LABELS, kind="prompt")] == 40
    assert (
        samples[key("flywheel_analyzer_tokens_total", **LABELS, kind="completion")] == 8
    )
    assert samples[key("flywheel_analyzer_cost_usd_total", **LABELS)] == 0.5
    assert samples[key("flywheel_analyzer_feedback_total", **LABELS)] == 3
    assert samples[key("flywheel_analyzer_rated_total", **LABELS)] == 2
    assert samples[key("flywheel_analyzer_positive_feedback_total", **LABELS)] == 1
    assert samples[key("flywheel_analyzer_corrections_total", **LABELS)] == 1
    assert samples[key("flywheel_analyzer_positive_feedback_ratio", **LABELS)] == 0.5
    orphans = key(
        "flywheel_analyzer_events_skipped_total", topic="feedback", reason="orphan"
    )
    assert samples[orphans] == 2


def test_experiment_gauges_mark_the_current_decision() -> None:
    gauges = ExperimentGauges(
        route="bot",
        experiment_id="exp-1",
        decision=Decision.PROMOTE,
        lift=0.2,
        lift_low=0.05,
        lift_high=0.35,
        p_value=0.01,
        srm_p_value=0.6,
        arms=(
            ArmGauges("control", requests=50, rated=30, units=20),
            ArmGauges("treatment", requests=48, rated=31, units=19),
        ),
    )

    samples = scrape(MetricsSnapshot(experiments=(gauges,)))

    labels = {"route": "bot", "experiment": "exp-1"}
    assert samples[key("flywheel_analyzer_experiment_lift", **labels)] == 0.2
    assert samples[key("flywheel_analyzer_experiment_lift_low", **labels)] == 0.05
    assert samples[key("flywheel_analyzer_experiment_lift_high", **labels)] == 0.35
    assert samples[key("flywheel_analyzer_experiment_p_value", **labels)] == 0.01
    assert samples[key("flywheel_analyzer_experiment_srm_p_value", **labels)] == 0.6
    decisions = {
        decision.value: samples[
            key("flywheel_analyzer_experiment_decision", **labels, decision=decision)
        ]
        for decision in Decision
    }
    assert decisions == {"continue": 0.0, "promote": 1.0, "roll_back": 0.0}
    treatment = {**labels, "arm": "treatment"}
    assert samples[key("flywheel_analyzer_experiment_arm_requests", **treatment)] == 48
    assert samples[key("flywheel_analyzer_experiment_arm_rated", **treatment)] == 31
    assert samples[key("flywheel_analyzer_experiment_arm_units", **treatment)] == 19
