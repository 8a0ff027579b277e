"""Which metric names the services declare, and which a PromQL expression reads."""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

from tests.conftest import REPO_ROOT

# Series Prometheus makes itself for every target, not declared by a service.
PROMETHEUS_OWN = frozenset(
    {"up", "scrape_duration_seconds", "scrape_samples_scraped", "ALERTS"}
)
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "summary": ("", "_sum", "_count", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
}
_PROMQL_WORDS = frozenset(
    {
        "sum", "max", "min", "avg", "count", "rate", "increase", "irate", "by",
        "without", "on", "ignoring", "group_left", "group_right", "and", "or",
        "unless", "vector", "histogram_quantile", "bool", "offset", "abs",
        "clamp_min", "clamp_max", "absent", "topk", "bottomk", "delta", "deriv",
        "label_values", "time", "scalar", "le",
    }
)  # fmt: skip


def metric_modules() -> list[Path]:
    return sorted(REPO_ROOT.glob("services/*/metrics.py"))


def _collectors(module_name: str) -> Iterator[Collector | MetricWrapperBase]:
    module = importlib.import_module(module_name)
    for value in vars(module).values():
        if isinstance(value, MetricWrapperBase):
            yield value
        elif (
            inspect.isclass(value)
            and Collector in value.__mro__
            and value.__module__ == module_name
        ):
            # A custom collector (the analyzer's) renders every family even when its
            # snapshot is empty.
            snapshot = getattr(module, "MetricsSnapshot")  # noqa: B009 - by convention
            yield value(snapshot)


def declared_metric_names() -> set[str]:
    """Every sample name the services can expose (counter `_total`, `_bucket`...)."""
    names: set[str] = set()
    for path in metric_modules():
        module_name = ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts)
        for collector in _collectors(module_name):
            registry = CollectorRegistry(auto_describe=False)
            registry.register(collector)
            for family in registry.collect():
                for suffix in _SUFFIXES.get(family.type, ("",)):
                    names.add(family.name + suffix)
    return names


def referenced_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (a rough, conservative parse)."""
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    without_labels = re.sub(r"\{[^}]*\}", "", without_strings)
    without_ranges = re.sub(r"\[[^\]]*\]", "", without_labels)
    without_groupings = re.sub(
        r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)",
        "",
        without_ranges,
    )
    words = re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", without_groupings)
    return {
        word
        for word in words
        if word not in _PROMQL_WORDS and not word.startswith("__")
    }
