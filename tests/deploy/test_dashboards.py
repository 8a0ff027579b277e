"""The committed Grafana dashboards: regenerated from code, reading declared metrics."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import REPO_ROOT
from tests.deploy.declared import (
    PROMETHEUS_OWN,
    declared_metric_names,
    referenced_metric_names,
)

DASHBOARD_DIR = REPO_ROOT / "deploy" / "grafana" / "dashboards"


def committed() -> dict[str, dict[str, Any]]:
    return {
        path.name: json.loads(path.read_text())
        for path in sorted(DASHBOARD_DIR.glob("*.json"))
    }


def panel_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(panel title, expression) of every query of every panel, rows included."""
    for panel in dashboard.get("panels", []):
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets") or []:
                yield inner["title"], target["expr"]


def test_committed_dashboards_match_the_code() -> None:
    build = pytest.importorskip(
        "deploy.grafana.build",
        reason="grafana-foundation-sdk is not installed; the dev dependencies have it",
    )

    rendered = build.render()

    on_disk = {
        path.name: path.read_text() for path in sorted(DASHBOARD_DIR.glob("*.json"))
    }

    assert on_disk == rendered, "run: python -m deploy.grafana.build"


def test_the_four_dashboards_exist_with_unique_ids() -> None:
    dashboards = committed()

    assert set(dashboards) == {
        "overview.json",
        "quality.json",
        "experiments.json",
        "pipeline.json",
    }
    uids = [d["uid"] for d in dashboards.values()]
    assert len(set(uids)) == len(uids)


def test_every_panel_query_reads_only_declared_metrics() -> None:
    declared = declared_metric_names() | PROMETHEUS_OWN
    unknown = {}

    for name, dashboard in committed().items():
        for title, expr in panel_queries(dashboard):
            missing = referenced_metric_names(expr) - declared
            if missing:
                unknown[f"{name}: {title}"] = sorted(missing)

    assert unknown == {}


def test_every_panel_has_a_query_and_a_description() -> None:
    for dashboard in committed().values():
        for panel in dashboard["panels"]:
            if panel["type"] == "row":
                continue
            assert panel.get("targets"), panel["title"]
            assert panel.get("description"), panel["title"]


def test_an_unknown_metric_is_caught() -> None:
    expr = "sum(rate(flywheel_gateway_requests_totl[5m])) / up"

    missing = referenced_metric_names(expr) - declared_metric_names()

    assert missing == {"flywheel_gateway_requests_totl", "up"}
