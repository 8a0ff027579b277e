"""The analyzer's faust app: joins feedback to interactions, keeps KPIs, judges tests.

Tables (in memory, each backed by a changelog topic, rebuilt from it on start):
- `joins`: interaction_id -> route, variant, arm, experiment of a recent interaction.
- `pending`: interaction_id -> feedback that arrived before its interaction.
- `kpis`: [route, variant, arm, source partition] -> counters.
- `skipped`: [topic, reason, source partition] -> count of events not counted.
- `experiment_arms`: experiment_id -> per-arm totals, fed by a repartition topic.
- `experiment_units`: [experiment_id, arm, unit hash] -> 1, the distinct assignment
  units (users) of each experiment, bounded per experiment (units.py); members of
  experiments no longer in the routing table are swept out.

NOTE: faust writes a table change to the changelog partition of the event being
processed. Every key above therefore lives in exactly one partition: the join keys
share the partition of their interaction_id (both input topics are keyed by it and
co-partitioned), counter keys carry their source partition, and experiment and unit
keys are written only from the repartition topic keyed by experiment_id. A key moves
with its partition on a rebalance, and the metrics sum only the partitions this
worker owns.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import faust
from faust.types import EventT, StreamT, TopicT

from services.analyzer import handlers, transport, units
from services.analyzer.errors import InvalidEventError
from services.analyzer.experiments import ExperimentJudge
from services.analyzer.metrics import MetricsSnapshot
from services.analyzer.settings import AnalyzerSettings
from services.common.events import Feedback
from services.common.kafka import Topics
from services.common.routing_client import RoutingTableWatcher

logger = logging.getLogger(__name__)

Event = EventT[bytes]

COUNTERS_LOG_INTERVAL_S = 60.0


def faust_options(settings: AnalyzerSettings) -> dict[str, Any]:
    """The faust app configuration derived from our settings."""
    kafka = settings.kafka
    options: dict[str, Any] = {
        "broker": [
            f"kafka://{server.strip()}" for server in kafka.bootstrap_servers.split(",")
        ],
        "store": "memory://",
        "datadir": settings.data_dir,
        "autodiscover": False,
        "web_enabled": False,
        "topic_partitions": kafka.partitions,
        "topic_replication_factor": kafka.replication_factor,
        "topic_disable_leader": True,
        # No standby copies: a worker's tables then hold only what it owns.
        "table_standby_replicas": 0,
        "broker_session_timeout": settings.broker_session_timeout_s,
        "broker_rebalance_timeout": settings.broker_rebalance_timeout_s,
        "broker_heartbeat_interval": 1.0,
        "broker_request_timeout": kafka.request_timeout_s + 10,
        "consumer_auto_offset_reset": "earliest",
        "producer_acks": -1,
        "producer_max_batch_size": settings.producer_max_batch_bytes,
    }
    if kafka.sasl_mechanism:
        options["broker_credentials"] = faust.SASLCredentials(
            username=kafka.sasl_username,
            password=(
                kafka.sasl_password.get_secret_value() if kafka.sasl_password else None
            ),
            mechanism=kafka.sasl_mechanism,
            ssl_context=kafka.ssl_context(),
        )
    elif kafka.uses_tls:
        options["broker_credentials"] = faust.SSLCredentials(kafka.ssl_context())
    return options


class Analyzer:
    """Wires the faust app: topics, tables, agents and the experiment timer."""

    def __init__(self, settings: AnalyzerSettings) -> None:
        self.settings = settings
        self.topics = Topics(settings.kafka.topic_prefix)
        self.app = transport.App(
            settings.app_id,
            fetch_max_wait_ms=settings.kafka.consumer_fetch_max_wait_ms,
            **faust_options(settings),
        )
        self.watcher = RoutingTableWatcher(settings.control)
        self._last_expiry_s: dict[int, float] = {}
        self._last_unit_sweep_s: dict[int, float] = {}
        self._declare_channels()
        self.judge = ExperimentJudge(
            settings, self.watcher, self.experiment_arms, self.experiments_topic
        )
        self._declare_processors()

    def _declare_channels(self) -> None:
        app, partitions = self.app, self.settings.kafka.partitions
        self.interactions_topic = self._raw_topic(self.topics.interactions)
        self.feedback_topic = self._raw_topic(self.topics.feedback)
        self.experiments_topic = self._raw_topic(self.topics.experiments)
        self.observations_topic = app.topic(
            f"{self.settings.app_id}-experiment-observations",
            key_type=str,
            value_type=None,
            value_serializer="json",
            partitions=partitions,
            internal=True,
        )

        def table(name: str) -> Any:
            return app.Table(name, default=None, partitions=partitions)

        self.joins = table("joins")
        self.pending = table("pending")
        self.kpis = table("kpis")
        self.skipped = table("skipped")
        self.experiment_arms = table("experiment_arms")
        self.experiment_units = table("experiment_units")

    def _raw_topic(self, name: str) -> TopicT:
        """One of our event topics: bytes in and out, parsed by the handlers."""
        return self.app.topic(
            name,
            key_type=bytes,
            value_type=bytes,
            key_serializer="raw",
            value_serializer="raw",
        )

    def _declare_processors(self) -> None:
        app = self.app
        app.agent(self.interactions_topic, name="analyzer.interactions")(
            self._interactions_agent
        )
        app.agent(self.feedback_topic, name="analyzer.feedback")(self._feedback_agent)
        app.agent(self.observations_topic, name="analyzer.observations")(
            self._observations_agent
        )
        app.timer(self.settings.experiments.evaluate_interval_s)(
            self.judge.evaluate_owned
        )
        app.timer(COUNTERS_LOG_INTERVAL_S)(self._log_counters)
        app.on_partitions_assigned.connect(self._on_partitions_assigned)

    async def _on_partitions_assigned(
        self, sender: Any, /, *args: Any, signal: Any, **kwargs: Any
    ) -> None:
        logger.info(
            "partitions assigned topic=%s partitions=%s",
            self.topics.interactions,
            sorted(self.owned_partitions(self.topics.interactions)),
        )

    async def _log_counters(self) -> None:
        snapshot = await self.snapshot()
        variants = snapshot.variants.values()
        logger.info(
            "counters requests=%d feedback=%d skipped=%d experiments=%d",
            sum(counts.get("requests", 0) for counts in variants),
            sum(counts.get("feedback", 0) for counts in variants),
            sum(snapshot.skipped.values()),
            len(snapshot.experiments),
        )

    # -- intake -------------------------------------------------------------------

    async def _interactions_agent(self, stream: StreamT[bytes]) -> AsyncIterator[None]:
        async for event in stream.events():
            await self._guarded(self._on_interaction, "interactions", event)
            yield None

    async def _feedback_agent(self, stream: StreamT[bytes]) -> AsyncIterator[None]:
        async for event in stream.events():
            await self._guarded(self._on_feedback, "feedback", event)
            yield None

    async def _guarded(
        self,
        handle: Callable[[Event], Awaitable[None]],
        topic: str,
        event: Event,
    ) -> None:
        """Handle one event; a failure is logged and counted, never stops the stream."""
        try:
            await handle(event)
            self._maybe_expire(event)
        except Exception:
            message = event.message
            logger.exception(
                "event failed topic=%s partition=%d offset=%d",
                message.topic,
                message.partition,
                message.offset,
            )
            self._count_skipped(topic, "error", event)

    async def _observations_agent(self, stream: StreamT[Any]) -> AsyncIterator[None]:
        capacity = self.settings.experiments.unit_sample_capacity
        async for event in stream.events():
            observation, partition = event.value, event.message.partition
            key = observation["experiment_id"]
            value = handlers.apply_observation(
                self.experiment_arms.get(key), observation, partition
            )
            self.experiment_arms[key] = handlers.count_unit(
                value, observation, self.experiment_units, capacity
            )
            self._maybe_sweep_units(partition)
            yield None

    def _maybe_sweep_units(self, partition: int) -> None:
        """Drop the unit members of this partition's experiments that have ended.

        Runs inside event processing of the observations partition that wrote them,
        so that the deletions go to the right changelog partition.
        """
        now_s = time.time()
        last_s = self._last_unit_sweep_s.setdefault(partition, now_s)
        table = self.watcher.table
        if now_s - last_s < self.settings.expire_interval_s or table.version == 0:
            return
        self._last_unit_sweep_s[partition] = now_s
        ended = {
            experiment_id: value
            for experiment_id, value in list(self.experiment_arms.items())
            if value is not None
            and value.get("partition") == partition
            and not value.get("units_swept")
            and not handlers.planned_split(table, value["route"], experiment_id)[0]
        }
        if not ended:
            return
        dropped = units.drop_experiments(self.experiment_units, set(ended))
        for experiment_id, value in ended.items():
            self.experiment_arms[experiment_id] = {**value, "units_swept": True}
        logger.info(
            "unit samples dropped partition=%d experiments=%d units=%d",
            partition,
            len(ended),
            dropped,
        )

    async def _on_interaction(self, event: Event) -> None:
        partition = event.message.partition
        try:
            interaction = handlers.parse_interaction(event.value)
        except InvalidEventError as error:
            self._count_skipped("interactions", error.reason, event)
            return
        key = str(interaction.interaction_id)
        if self.joins.get(key) is not None:
            self._count_skipped("interactions", "duplicate", event)
            return
        entry = handlers.join_entry(interaction, partition, time.time())
        self._add_kpis(entry, handlers.interaction_counts(interaction), partition)
        if interaction.experiment_id:
            await self._observe(handlers.request_observation(interaction))
        waiting = self.pending.get(key)
        if waiting is not None:
            del self.pending[key]
            for raw in waiting["feedback"]:
                feedback = Feedback.model_validate_json(raw)
                if handlers.from_other_project(entry, feedback):
                    self._count_skipped("feedback", "other_project", event)
                else:
                    entry = await self._count_feedback(entry, feedback)
        self.joins[key] = entry

    async def _on_feedback(self, event: Event) -> None:
        try:
            feedback = handlers.parse_feedback(event.value)
        except InvalidEventError as error:
            self._count_skipped("feedback", error.reason, event)
            return
        key, event_id = str(feedback.interaction_id), str(feedback.event_id)
        entry = self.joins.get(key)
        if entry is None:
            self._hold_feedback(key, event_id, event)
        elif event_id in entry["feedback_ids"]:
            self._count_skipped("feedback", "duplicate", event)
        elif handlers.from_other_project(entry, feedback):
            self._count_skipped("feedback", "other_project", event)
        else:
            self.joins[key] = await self._count_feedback(entry, feedback)

    def _hold_feedback(self, key: str, event_id: str, event: Event) -> None:
        waiting = self.pending.get(key)
        if waiting is not None and any(
            json.loads(raw)["event_id"] == event_id for raw in waiting["feedback"]
        ):
            self._count_skipped("feedback", "duplicate", event)
            return
        self.pending[key] = handlers.with_pending(
            waiting, event.value, event.message.partition, time.time()
        )

    async def _count_feedback(
        self, entry: dict[str, Any], feedback: Feedback
    ) -> dict[str, Any]:
        """Count `feedback` against its joined interaction; returns the new entry."""
        self._add_kpis(entry, handlers.feedback_counts(feedback), entry["partition"])
        positive = feedback.is_positive()
        # An experiment counts one rating per interaction: its first.
        if entry["experiment_id"] and positive is not None and not entry["rated"]:
            await self._observe(handlers.rating_observation(entry, positive))
        return handlers.with_feedback(entry, feedback)

    async def _observe(self, observation: dict[str, Any]) -> None:
        await self.observations_topic.send(
            key=observation["experiment_id"], value=observation
        )

    def _add_kpis(
        self, entry: dict[str, Any], counts: dict[str, float], partition: int
    ) -> None:
        key = handlers.kpi_key(
            entry["route"], entry["variant"], entry["arm"], partition
        )
        self.kpis[key] = handlers.add_counts(self.kpis.get(key), counts)

    def _count_skipped(self, topic: str, reason: str, event: Event) -> None:
        message = event.message
        logger.debug(
            "event skipped topic=%s partition=%d offset=%d reason=%s",
            message.topic,
            message.partition,
            message.offset,
            reason,
        )
        key = handlers.skip_key(topic, reason, message.partition)
        self.skipped[key] = (self.skipped.get(key) or 0) + 1

    def _maybe_expire(self, event: Event) -> None:
        """Drop old join entries and orphaned feedback of this event's partition.

        Runs inside event processing so that the deletions go to the right changelog
        partition; a partition without traffic keeps its entries until traffic comes.
        """
        partition, now_s = event.message.partition, time.time()
        last_s = self._last_expiry_s.get(partition)
        if last_s is None or now_s - last_s < self.settings.expire_interval_s:
            self._last_expiry_s.setdefault(partition, now_s)
            return
        self._last_expiry_s[partition] = now_s
        old_joins = handlers.expired_keys(
            list(self.joins.items()), partition, now_s - self.settings.join_ttl_s
        )
        for key in old_joins:
            del self.joins[key]
        orphans = handlers.expired_keys(
            list(self.pending.items()), partition, now_s - self.settings.pending_ttl_s
        )
        for key in orphans:
            for _ in self.pending[key]["feedback"]:
                self._count_skipped("feedback", "orphan", event)
            del self.pending[key]
        if old_joins or orphans:
            logger.info(
                "expired partition=%d joins=%d orphaned_interactions=%d",
                partition,
                len(old_joins),
                len(orphans),
            )

    # -- metrics ------------------------------------------------------------------

    def owned_partitions(self, topic: str) -> set[int]:
        return {
            tp.partition
            for tp in self.app.assignor.assigned_actives()
            if tp.topic == topic
        }

    async def snapshot(self) -> MetricsSnapshot:
        """Sum the counters of the partitions this worker owns (runs on the loop)."""
        owned = self.owned_partitions(self.topics.interactions)
        variants: dict[tuple[str, str, str], dict[str, float]] = {}
        for key, counts in list(self.kpis.items()):
            route, variant, arm, partition = handlers.split_kpi_key(key)
            if partition in owned and counts is not None:
                labels = (route, variant, arm)
                variants[labels] = handlers.add_counts(variants.get(labels), counts)
        skipped: dict[tuple[str, str], float] = {}
        for key, count in list(self.skipped.items()):
            topic, reason, partition = handlers.split_skip_key(key)
            if partition in owned and count:
                skipped[(topic, reason)] = skipped.get((topic, reason), 0) + count
        return MetricsSnapshot(
            variants=variants,
            skipped=skipped,
            experiments=self.judge.gauges(),
        )
