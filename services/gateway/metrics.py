"""Every Prometheus metric the gateway exports, on its own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS_S = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)  # fmt: skip

REQUESTS = Counter(
    "flywheel_gateway_requests_total",
    "Chat completion requests answered, by route, variant and HTTP status.",
    ["route", "variant", "status"],
    registry=REGISTRY,
)
REQUEST_SECONDS = Histogram(
    "flywheel_gateway_request_seconds",
    "Time from a chat request's arrival to its last byte, by route and variant.",
    ["route", "variant"],
    buckets=_LATENCY_BUCKETS_S,
    registry=REGISTRY,
)
UPSTREAM_SECONDS = Histogram(
    "flywheel_gateway_upstream_seconds",
    "Time the upstream model took to answer (headers, or the whole non-streamed body).",
    ["route", "variant"],
    buckets=_LATENCY_BUCKETS_S,
    registry=REGISTRY,
)
UPSTREAM_RETRIES = Counter(
    "flywheel_gateway_upstream_retries_total",
    "Upstream calls sent again after a retriable failure, by route and variant.",
    ["route", "variant"],
    registry=REGISTRY,
)
UPSTREAM_FALLBACKS = Counter(
    "flywheel_gateway_upstream_fallbacks_total",
    "Calls handed to another variant of the route after theirs failed.",
    ["route", "variant", "fallback"],
    registry=REGISTRY,
)
EVENTS_PUBLISHED = Counter(
    "flywheel_gateway_events_published_total",
    "Events the broker acknowledged, by topic.",
    ["topic"],
    registry=REGISTRY,
)
EVENTS_DROPPED = Counter(
    "flywheel_gateway_events_dropped_total",
    "Events lost: queue or spool full, the broker refused them with no spool, or "
    "the event could not be built (unbuildable: a bug, logged).",
    ["topic", "reason"],
    registry=REGISTRY,
)
PUBLISH_QUEUE_DEPTH = Gauge(
    "flywheel_gateway_publish_queue_depth",
    "Events waiting in memory to be sent to the broker.",
    registry=REGISTRY,
)
EVENTS_SPOOLED = Counter(
    "flywheel_gateway_events_spooled_total",
    "Events written to the local spool because the broker did not take them.",
    ["topic"],
    registry=REGISTRY,
)
EVENTS_REPLAYED = Counter(
    "flywheel_gateway_events_replayed_total",
    "Spooled events the broker later acknowledged.",
    ["topic"],
    registry=REGISTRY,
)
SPOOL_BYTES = Gauge(
    "flywheel_gateway_spool_bytes",
    "Bytes of events waiting in the local spool.",
    registry=REGISTRY,
)
FEEDBACK_REFUSED = Counter(
    "flywheel_gateway_feedback_refused_total",
    "Feedback not published: for another project's interaction (other_project), "
    "or for an id unknown in the refuse mode (not_found).",
    ["reason"],
    registry=REGISTRY,
)
