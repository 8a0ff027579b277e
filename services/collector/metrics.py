"""Every metric the collector exports, declared once.

They are served on /metrics by the probe server (services/common/probes.py),
beside /livez and /readyz.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EVENTS_CONSUMED = Counter(
    "flywheel_collector_events_consumed_total",
    "Records read from Kafka, valid or not.",
    ["topic"],
)
EVENTS_STORED = Counter(
    "flywheel_collector_events_stored_total",
    "Events inserted into PostgreSQL (first time seen).",
    ["topic"],
)
EVENTS_DUPLICATE = Counter(
    "flywheel_collector_events_duplicate_total",
    "Valid events not inserted because their event_id (or interaction_id) was stored.",
    ["topic"],
)
EVENTS_DEADLETTERED = Counter(
    "flywheel_collector_events_deadlettered_total",
    "Records sent to the dead-letter topic, by reason.",
    ["topic", "reason"],
)
REPEAT_BATCHES = Counter(
    "flywheel_collector_repeat_batches_total",
    "Batches that repeated a stored event (or one of their own) and took the keyed"
    " insert path instead of plain COPY.",
)
STORE_RETRIES = Counter(
    "flywheel_collector_store_retries_total",
    "Retries of a batch step that failed and may succeed later: PostgreSQL could not"
    " take its rows, the broker its dead letters or its offsets.",
)
BATCH_SIZE = Histogram(
    "flywheel_collector_batch_size",
    "Records per processed batch.",
    buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000),
)
BATCH_SECONDS = Histogram(
    "flywheel_collector_batch_seconds",
    "Time to validate, store, dead-letter and commit one batch.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
CONSUMER_LAG = Gauge(
    "flywheel_collector_consumer_lag",
    "Records behind the high watermark, summed over assigned partitions.",
    ["topic"],
)
ORPHAN_FEEDBACK = Gauge(
    "flywheel_collector_orphan_feedback",
    "Feedback rows (in the orphan window) whose interaction is not stored.",
)
