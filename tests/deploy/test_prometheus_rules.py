"""Prometheus scrape config and alert rules: promtool checks and rule unit tests."""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

import pytest
import yaml

from tests.conftest import REPO_ROOT
from tests.deploy.declared import (
    PROMETHEUS_OWN,
    declared_metric_names,
    referenced_metric_names,
)

PROMETHEUS_DIR = REPO_ROOT / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not found: install the Debian package `prometheus`",
)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args],
        cwd=PROMETHEUS_DIR,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


@needs_promtool
def test_scrape_config_is_valid() -> None:
    result = promtool("check", "config", "prometheus.yml")

    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_alert_rules_are_valid() -> None:
    result = promtool("check", "rules", "alerts.yml")

    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_alert_rule_unit_tests_pass() -> None:
    result = promtool("test", "rules", "tests/alerts_test.yml")

    assert result.returncode == 0, result.stdout + result.stderr


def test_every_service_is_scraped_on_its_default_port() -> None:
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())

    targets = {
        job["job_name"]: [t for c in job["static_configs"] for t in c["targets"]]
        for job in config["scrape_configs"]
    }

    assert targets == {
        "flywheel-gateway": ["127.0.0.1:8080"],
        "flywheel-collector": ["127.0.0.1:9101"],
        "flywheel-analyzer": ["127.0.0.1:9102"],
        "flywheel-trainer": ["127.0.0.1:9103"],
    }


def test_every_alert_reads_only_declared_metrics() -> None:
    declared = declared_metric_names() | PROMETHEUS_OWN

    unknown = {
        rule["alert"]: sorted(referenced_metric_names(rule["expr"]) - declared)
        for rule in alert_rules()
        if referenced_metric_names(rule["expr"]) - declared
    }

    assert unknown == {}


def test_every_alert_is_unit_tested() -> None:
    tests = (PROMETHEUS_DIR / "tests" / "alerts_test.yml").read_text()

    untested = [
        r["alert"] for r in alert_rules() if f"alertname: {r['alert']}" not in tests
    ]

    assert untested == []
