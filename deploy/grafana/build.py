"""Flywheel's Grafana dashboards as code (grafana-foundation-sdk), written as JSON.

    python -m deploy.grafana.build          # rewrite deploy/grafana/dashboards/*.json
    python -m deploy.grafana.build --check  # exit 1 when the JSON differs from the code

Every query reads only metrics that a service declares in services/*/metrics.py (a
test checks it). `$route` and `$__rate_interval` are Grafana variables; sums over
instances make the numbers right with any number of replicas.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import table
from grafana_foundation_sdk.cog.encoder import JSONEncoder

from deploy.grafana.panels import (
    DATASOURCE,
    RATE,
    ROUTE,
    graph,
    new_dashboard,
    query,
    ratio,
    single,
)

OUT_DIR = Path(__file__).resolve().parent / "dashboards"


# -- overview ------------------------------------------------------------------------


def overview() -> db.Dashboard:
    requests = "flywheel_gateway_requests_total"
    latency = "flywheel_gateway_request_seconds_bucket"
    return (
        new_dashboard(
            "flywheel-overview",
            "Flywheel / Overview",
            "Traffic, errors, latency and cost of the routes served by the gateway.",
        )
        .with_row(db.Row("Traffic and errors"))
        .with_panel(
            single(
                "Requests in range",
                "Chat completions answered by the gateways in the time range.",
                "short",
                f"sum(increase({requests}{{{ROUTE}}}[$__range]))",
            )
        )
        .with_panel(
            single(
                "Error share",
                "Share of chat completions answered with a 5xx status.",
                "percentunit",
                f'(sum(rate({requests}{{{ROUTE},status=~"5.."}}[{RATE}])) or vector(0))'
                f"\n/ sum(rate({requests}{{{ROUTE}}}[{RATE}]))",
            )
        )
        .with_panel(
            graph(
                "Requests per second",
                "Chat completions answered, per route and variant (all gateways).",
                "reqps",
                (
                    f"sum by (route, variant) (rate({requests}{{{ROUTE}}}[{RATE}]))",
                    "{{route}} {{variant}}",
                ),
            )
        )
        .with_panel(
            graph(
                "Responses by status",
                "Chat completions per HTTP status class.",
                "reqps",
                (
                    f"sum by (status) (rate({requests}{{{ROUTE}}}[{RATE}]))",
                    "{{status}}",
                ),
            )
        )
        .with_panel(
            graph(
                "Error rate per variant",
                "Interactions that ended in an error, as the analyzer counted them.",
                "percentunit",
                (
                    ratio(
                        "flywheel_analyzer_errors_total",
                        "flywheel_analyzer_requests_total",
                        "route, variant",
                    ),
                    "{{route}} {{variant}}",
                ),
            )
        )
        .with_row(db.Row("Latency"))
        .with_panel(
            graph(
                "Gateway latency",
                "Time from a chat request's arrival to its last byte.",
                "s",
                *(
                    (
                        f"histogram_quantile({q}, sum by (le) "
                        f"(rate({latency}{{{ROUTE}}}[{RATE}])))",
                        f"p{round(q * 100)}",
                    )
                    for q in (0.5, 0.95, 0.99)
                ),
            )
        )
        .with_panel(
            graph(
                "Upstream latency p95 per variant",
                "Time the upstream model took to answer, per variant.",
                "s",
                (
                    "histogram_quantile(0.95, sum by (le, variant) "
                    f"(rate(flywheel_gateway_upstream_seconds_bucket{{{ROUTE}}}"
                    f"[{RATE}])))",
                    "{{variant}}",
                ),
            )
        )
        .with_panel(
            graph(
                "Mean latency and time to first token per variant",
                "Analyzer's means over the interval; time to first token only counts "
                "streamed answers.",
                "s",
                (
                    ratio(
                        "flywheel_analyzer_latency_seconds_sum",
                        "flywheel_analyzer_latency_seconds_count",
                        "variant",
                    ),
                    "total {{variant}}",
                ),
                (
                    ratio(
                        "flywheel_analyzer_ttft_seconds_sum",
                        "flywheel_analyzer_ttft_seconds_count",
                        "variant",
                    ),
                    "first token {{variant}}",
                ),
            )
        )
        .with_row(db.Row("Cost"))
        .with_panel(
            graph(
                "Cost per hour",
                "US dollars per hour at the current rate, per variant.",
                "currencyUSD",
                (
                    "3600 * sum by (route, variant) "
                    f"(rate(flywheel_analyzer_cost_usd_total{{{ROUTE}}}[{RATE}]))",
                    "{{route}} {{variant}}",
                ),
            )
        )
        .with_panel(
            graph(
                "Tokens per second",
                "Prompt and completion tokens used, per variant.",
                "short",
                (
                    "sum by (variant, kind) "
                    f"(rate(flywheel_analyzer_tokens_total{{{ROUTE}}}[{RATE}]))",
                    "{{variant}} {{kind}}",
                ),
            )
        )
    )


# -- quality -------------------------------------------------------------------------


def quality() -> db.Dashboard:
    positive, rated = (
        "flywheel_analyzer_positive_feedback_total",
        "flywheel_analyzer_rated_total",
    )
    return (
        new_dashboard(
            "flywheel-quality",
            "Flywheel / Quality",
            "Positive-feedback rate (the accuracy proxy), engagement and corrections "
            "per model version.",
        )
        .with_panel(
            graph(
                "Positive-feedback rate per model version",
                "Share of ratings that are positive over the interval, per variant "
                "(model version).",
                "percentunit",
                (ratio(positive, rated, "route, variant"), "{{route}} {{variant}}"),
            )
            .min(0)
            .max(1)
        )
        .with_panel(
            graph(
                "Positive-feedback rate, last hour",
                "The same share over a sliding hour: steadier when ratings are few.",
                "percentunit",
                (
                    f"sum by (route, variant) (increase({positive}{{{ROUTE}}}[1h]))\n"
                    f"/ sum by (route, variant) (increase({rated}{{{ROUTE}}}[1h]))",
                    "{{route}} {{variant}}",
                ),
            )
            .min(0)
            .max(1)
        )
        .with_panel(
            graph(
                "Ratings per second",
                "How many ratings each variant receives: the sample behind the rate.",
                "short",
                (
                    f"sum by (route, variant) (rate({rated}{{{ROUTE}}}[{RATE}]))",
                    "{{route}} {{variant}}",
                ),
            )
        )
        .with_panel(
            graph(
                "Engagement: feedback per request",
                "Feedback events (any kind) per interaction served.",
                "percentunit",
                (
                    ratio(
                        "flywheel_analyzer_feedback_total",
                        "flywheel_analyzer_requests_total",
                        "route, variant",
                    ),
                    "{{route}} {{variant}}",
                ),
            )
        )
        .with_panel(
            graph(
                "Corrections per request",
                "Preferred answers users sent, per interaction served.",
                "percentunit",
                (
                    ratio(
                        "flywheel_analyzer_corrections_total",
                        "flywheel_analyzer_requests_total",
                        "route, variant",
                    ),
                    "{{route}} {{variant}}",
                ),
            )
        )
    )


# -- experiments -----------------------------------------------------------------------


def experiments() -> db.Dashboard:
    experiment = f"{{{ROUTE}}}"
    prefix = "flywheel_analyzer_experiment"
    return (
        new_dashboard(
            "flywheel-experiments",
            "Flywheel / Experiments",
            "Live A/B experiments: lift of the positive-feedback rate with its "
            "always-valid interval, sample sizes, sample-ratio check and decisions.",
        )
        .with_panel(
            table.Panel()
            .title("Current decision")
            .description("The analyzer's latest decision for each live experiment.")
            .datasource(DATASOURCE)
            .height(6)
            .span(24)
            .with_target(
                query(
                    f"max by (route, experiment, decision) "
                    f"({prefix}_decision{experiment}) == 1"
                )
                .format("table")
                .instant()
            )
        )
        .with_panel(
            graph(
                "Lift with its always-valid interval",
                "Treatment minus control positive-feedback rate; the interval stays "
                "valid however often it is looked at (mSPRT).",
                "percentunit",
                (
                    f"max by (experiment) ({prefix}_lift{experiment})",
                    "lift {{experiment}}",
                ),
                (
                    f"max by (experiment) ({prefix}_lift_low{experiment})",
                    "low {{experiment}}",
                ),
                (
                    f"max by (experiment) ({prefix}_lift_high{experiment})",
                    "high {{experiment}}",
                ),
            )
        )
        .with_panel(
            graph(
                "p-values",
                "Always-valid p-value of the lift, and the sample-ratio-mismatch "
                "p-value (an SRM below 0.001 blocks promotion).",
                "short",
                (
                    f"max by (experiment) ({prefix}_p_value{experiment})",
                    "lift {{experiment}}",
                ),
                (
                    f"max by (experiment) ({prefix}_srm_p_value{experiment})",
                    "SRM {{experiment}}",
                ),
            )
            .min(0)
            .max(1)
        )
        .with_panel(
            graph(
                "Rated interactions per arm",
                "The sample behind the lift: first ratings per arm.",
                "short",
                (
                    f"max by (experiment, arm) ({prefix}_arm_rated{experiment})",
                    "{{experiment}} {{arm}}",
                ),
            )
        )
        .with_panel(
            graph(
                "Users and requests per arm",
                "Distinct users (what the sample-ratio check tests) and requests.",
                "short",
                (
                    f"max by (experiment, arm) ({prefix}_arm_units{experiment})",
                    "users {{experiment}} {{arm}}",
                ),
                (
                    f"max by (experiment, arm) ({prefix}_arm_requests{experiment})",
                    "requests {{experiment}} {{arm}}",
                ),
            )
        )
        .with_panel(
            graph(
                "Decisions over time",
                "1 while a decision holds: continue, promote or roll back.",
                "short",
                (
                    f"max by (experiment, decision) ({prefix}_decision{experiment})",
                    "{{experiment}} {{decision}}",
                ),
            )
            .min(0)
            .max(1)
        )
    )


# -- pipeline health -------------------------------------------------------------------


def pipeline() -> db.Dashboard:
    collector, gateway = "flywheel_collector", "flywheel_gateway"
    return (
        new_dashboard(
            "flywheel-pipeline",
            "Flywheel / Pipeline health",
            "Are events flowing: scrape targets, gateway publish queue and drops, "
            "collector lag and dead letters, analyzer skips.",
        )
        .with_panel(
            graph(
                "Targets up",
                "1 when Prometheus scraped the service's /metrics, per job and "
                "instance.",
                "short",
                ('up{job=~"flywheel-.*"}', "{{job}} {{instance}}"),
            )
            .min(0)
            .max(1)
        )
        .with_panel(
            graph(
                "Gateway publish queue",
                "Events waiting in each gateway's memory to be sent to Kafka.",
                "short",
                (f"sum by (instance) ({gateway}_publish_queue_depth)", "{{instance}}"),
            )
        )
        .with_panel(
            graph(
                "Gateway spool",
                "Bytes of events waiting on each gateway's disk for the broker; they "
                "are replayed in order once it takes them again.",
                "bytes",
                (f"sum by (instance) ({gateway}_spool_bytes)", "{{instance}}"),
            )
        )
        .with_panel(
            graph(
                "Gateway events published and dropped",
                "Events the broker acknowledged, and events lost (queue or spool "
                "full, or the broker refused them with no spool).",
                "short",
                (
                    f"sum by (topic) (rate({gateway}_events_published_total[{RATE}]))",
                    "published {{topic}}",
                ),
                (
                    "sum by (topic, reason) "
                    f"(rate({gateway}_events_dropped_total[{RATE}]))",
                    "dropped {{topic}} {{reason}}",
                ),
            )
        )
        .with_panel(
            graph(
                "Collector consumer lag",
                "Records behind the high watermark, per topic (all collectors).",
                "short",
                (f"sum by (topic) ({collector}_consumer_lag)", "{{topic}}"),
            )
        )
        .with_panel(
            graph(
                "Collector throughput",
                "Records read, stored and found duplicate per second, per topic.",
                "short",
                (
                    f"sum by (topic) (rate({collector}_events_consumed_total[{RATE}]))",
                    "consumed {{topic}}",
                ),
                (
                    f"sum by (topic) (rate({collector}_events_stored_total[{RATE}]))",
                    "stored {{topic}}",
                ),
                (
                    "sum by (topic) "
                    f"(rate({collector}_events_duplicate_total[{RATE}]))",
                    "duplicate {{topic}}",
                ),
            )
        )
        .with_panel(
            graph(
                "Dead letters",
                "Records sent to the dead-letter topic per second, by source topic "
                "and reason.",
                "short",
                (
                    "sum by (topic, reason) "
                    f"(rate({collector}_events_deadlettered_total[{RATE}]))",
                    "{{topic}} {{reason}}",
                ),
            )
        )
        .with_panel(
            graph(
                "Collector batches",
                "p95 time to store and commit one batch, PostgreSQL retries, and "
                "batches that repeated a stored event (the slower keyed insert).",
                "s",
                (
                    "histogram_quantile(0.95, sum by (le) "
                    f"(rate({collector}_batch_seconds_bucket[{RATE}])))",
                    "batch p95",
                ),
                (f"sum(rate({collector}_store_retries_total[{RATE}]))", "retries/s"),
                (
                    f"sum(rate({collector}_repeat_batches_total[{RATE}]))",
                    "repeat batches/s",
                ),
            )
        )
        .with_panel(
            graph(
                "Orphan feedback and analyzer skips",
                "Stored feedback whose interaction is missing, and events the "
                "analyzer did not count (invalid, duplicate, orphaned).",
                "short",
                (f"sum({collector}_orphan_feedback)", "orphan feedback rows"),
                (
                    "sum by (topic, reason) "
                    f"(rate(flywheel_analyzer_events_skipped_total[{RATE}]))",
                    "skipped {{topic}} {{reason}}",
                ),
            )
        )
    )


DASHBOARDS: dict[str, Callable[[], db.Dashboard]] = {
    "overview": overview,
    "quality": quality,
    "experiments": experiments,
    "pipeline": pipeline,
}


def render() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    return {
        f"{name}.json": json.dumps(
            build().build(), cls=JSONEncoder, indent=2, sort_keys=True
        )
        + "\n"
        for name, build in DASHBOARDS.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail on drift")
    args = parser.parse_args(argv)
    stale = []
    for file_name, text in render().items():
        path = OUT_DIR / file_name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
            continue
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    if stale:
        print("stale, run python -m deploy.grafana.build:", *stale, sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
