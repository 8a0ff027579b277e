"""A real Prometheus scrapes real services while traffic flows; every dashboard query
and every alert rule is evaluated against it through its HTTP API.

Services: the gateway (in-process, a static routing table with a 50/50 experiment and
an upstream stub), the collector and the analyzer (each `python -m services.<name>`),
on the session's broker and PostgreSQL. The trainer is not started: its /metrics
holds no Flywheel metric, and a routing table from it would end the test's
experiment. Prometheus is the Debian package's binary, scraping every second.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from services.common.embedded import free_port, stop_process
from services.common.kafka import Topics, make_producer
from services.common.settings import KafkaSettings, PostgresSettings
from services.gateway.app import App
from services.gateway.tables import StaticTableSource
from tests.conftest import REPO_ROOT, unique_name, wait_until
from tests.gateway.conftest import AUTH, make_settings, make_table
from tests.gateway.upstream_stub import UpstreamStub

pytestmark = pytest.mark.integration

PROMETHEUS = shutil.which("prometheus")
DEPLOY = REPO_ROOT / "deploy"
# What Grafana would put in for its variables at a 1 s scrape interval.
VARIABLES = {"$__rate_interval": "20s", "$__range": "5m", "$route": ".*"}
PUBLISH_QUEUE_SIZE = 16
DEADLINE_S = 120.0


@pytest.fixture
def prometheus_binary() -> str:
    if PROMETHEUS is None:
        pytest.skip("prometheus not found: install the Debian package `prometheus`")
    return PROMETHEUS


class ServiceProcess:
    """`python -m services.<name>` with its own environment and log file."""

    def __init__(self, name: str, env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        base = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", f"services.{name}"],
                cwd=REPO_ROOT,
                env={**base, **env},
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            tail = self.log_path.read_text(errors="replace").splitlines()[-40:]
            raise AssertionError(
                f"{self.name} exited with {self.process.returncode}:\n"
                + "\n".join(tail)
            )

    def stop(self) -> None:
        stop_process(self.process, grace_s=20.0)


def backend_env(kafka: KafkaSettings, postgres: PostgresSettings) -> dict[str, str]:
    return {
        "FLYWHEEL_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "FLYWHEEL_KAFKA__TOPIC_PREFIX": kafka.topic_prefix,
        "FLYWHEEL_KAFKA__PARTITIONS": str(kafka.partitions),
        "FLYWHEEL_POSTGRES__DSN": postgres.dsn.get_secret_value(),
        "FLYWHEEL_POSTGRES__DB_SCHEMA": postgres.db_schema,
        # Nothing listens there: the analyzer keeps the experiment live (no table).
        "FLYWHEEL_CONTROL__ADDRESS": f"127.0.0.1:{free_port()}",
        "FLYWHEEL_CONTROL__TOKEN": "prometheus-test-token",
    }


@pytest.fixture
def backends(
    kafka_settings: KafkaSettings, pg_settings: PostgresSettings, tmp_path: Path
) -> Iterator[dict[str, int]]:
    """The collector and the analyzer as processes; yields their metrics ports."""
    ports = {"collector": free_port(), "analyzer": free_port()}
    env = backend_env(kafka_settings, pg_settings)
    collector = ServiceProcess(
        "collector",
        {
            **env,
            "FLYWHEEL_COLLECTOR_METRICS_PORT": str(ports["collector"]),
            "FLYWHEEL_COLLECTOR_GROUP_ID": unique_name("collector-"),
            "FLYWHEEL_COLLECTOR_ORPHAN_REFRESH_S": "2",
        },
        tmp_path,
    )
    analyzer = ServiceProcess(
        "analyzer",
        {
            **env,
            "FLYWHEEL_ANALYZER_METRICS_PORT": str(ports["analyzer"]),
            "FLYWHEEL_ANALYZER_APP_ID": unique_name("analyzer-"),
            "FLYWHEEL_ANALYZER_DATA_DIR": str(tmp_path / "faust"),
            "FLYWHEEL_ANALYZER_CONTROL__RECONNECT_MAX_BACKOFF_S": "1",
            "FLYWHEEL_ANALYZER_EXPERIMENTS__EVALUATE_INTERVAL_S": "1",
        },
        tmp_path,
    )
    try:
        yield ports
        collector.check_alive()
        analyzer.check_alive()
    finally:
        analyzer.stop()
        collector.stop()


@pytest.fixture
async def gateway(kafka_settings: KafkaSettings) -> AsyncIterator[tuple[App, int]]:
    upstream = UpstreamStub()
    await upstream.start()
    port = free_port()
    app = App(
        make_settings(
            kafka=kafka_settings, port=port, publish_queue_size=PUBLISH_QUEUE_SIZE
        ),
        tables=StaticTableSource(make_table(upstream.base_url)),
    )
    running = asyncio.create_task(app.run())
    await asyncio.wait_for(app.listening.wait(), 30)
    yield app, port
    app.stop()
    await asyncio.wait_for(running, 30)
    await upstream.stop()


def prometheus_config(ports: dict[str, int], rules: Path) -> dict[str, Any]:
    """The committed scrape config, pointed at this test's services."""
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(rules)]
    jobs = []
    for job in config["scrape_configs"]:
        service = job["job_name"].removeprefix("flywheel-")
        if service in ports:
            job["static_configs"] = [{"targets": [f"127.0.0.1:{ports[service]}"]}]
            jobs.append(job)
    config["scrape_configs"] = jobs
    return config


class PrometheusServer:
    """The Debian package's `prometheus` on a free loopback port."""

    def __init__(self, binary: str, data_dir: Path) -> None:
        self.binary = binary
        self.data_dir = data_dir
        self.url = f"http://127.0.0.1:{free_port()}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, ports: dict[str, int]) -> None:
        config_path = self.data_dir / "prometheus.yml"
        config = prometheus_config(ports, DEPLOY / "prometheus" / "alerts.yml")
        config_path.write_text(yaml.safe_dump(config))
        with (self.data_dir / "prometheus.log").open("ab") as log:
            self.process = subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={config_path}",
                    f"--storage.tsdb.path={self.data_dir / 'tsdb'}",
                    f"--web.listen-address={self.url.removeprefix('http://')}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    async def query(self, expr: str) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.get(
                f"{self.url}/api/v1/query", params={"query": expr}
            )
        return dict(response.json())

    async def get(self, path: str) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=10) as client:
            return dict((await client.get(f"{self.url}{path}")).json())

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, grace_s=10.0)


@pytest.fixture
def prometheus(prometheus_binary: str, tmp_path: Path) -> Iterator[PrometheusServer]:
    server = PrometheusServer(prometheus_binary, tmp_path)
    yield server
    server.stop()


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, expression) of every panel query, Grafana variables filled in."""
    queries = []
    for path in sorted((DEPLOY / "grafana" / "dashboards").glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets") or []:
                expr = target["expr"]
                for variable, value in VARIABLES.items():
                    expr = expr.replace(variable, value)
                queries.append((f"{path.stem}: {panel['title']}", expr))
    return queries


def alert_expressions() -> list[tuple[str, str]]:
    document = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return [
        (rule["alert"], rule["expr"])
        for group in document["groups"]
        for rule in group["rules"]
    ]


class Traffic:
    """Users asking the gateway and rating its answers until stopped."""

    def __init__(self, gateway_port: int) -> None:
        self.base_url = f"http://127.0.0.1:{gateway_port}/v1"
        self.random = random.Random(7)
        self.answered = 0
        self.stop = asyncio.Event()

    async def run(self) -> None:
        async with httpx.AsyncClient(
            base_url=self.base_url, headers=AUTH, timeout=10
        ) as client:
            while not self.stop.is_set():
                await self.one_exchange(client, self.answered)
                self.answered += 1
                # Paced so that every scrape sees the counters move.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), 0.05)

    async def one_exchange(self, client: httpx.AsyncClient, index: int) -> None:
        prompt = "fail:503" if index % 10 == 9 else f"question {index}"
        body = {
            "model": "support-bot",
            "messages": [{"role": "user", "content": prompt}],
            "user": f"user-{index % 40}",
            "stream": index % 3 == 0,
        }
        response = await client.post("/chat/completions", json=body)
        interaction_id = response.headers.get("x-flywheel-interaction-id")
        if response.status_code != 200 or not interaction_id:
            return
        feedback: dict[str, Any] = {
            "interaction_id": interaction_id,
            "kind": "thumbs",
            "value": self.random.choice([1, 1, -1]),
        }
        if index % 4 == 0:
            feedback = {
                "interaction_id": interaction_id,
                "kind": "correction",
                "text": "a better answer",
            }
        await client.post("/feedback", json=feedback)


async def overflow_publish_queue(gateway_port: int) -> None:
    """One feedback batch larger than the publish queue: the rest is dropped."""
    items = [
        {"interaction_id": str(uuid.uuid4()), "kind": "thumbs", "value": 1}
        for _ in range(PUBLISH_QUEUE_SIZE * 3)
    ]
    async with httpx.AsyncClient(headers=AUTH, timeout=10) as client:
        response = await client.post(
            f"http://127.0.0.1:{gateway_port}/v1/feedback", json={"feedback": items}
        )
    assert response.status_code == 202, response.text


async def send_invalid_feedback(kafka: KafkaSettings) -> None:
    """A record no schema accepts: the collector dead-letters it, the analyzer skips."""
    producer = make_producer(kafka, client_id="prometheus-test")
    await producer.start()
    try:
        await producer.send_and_wait(
            Topics(kafka.topic_prefix).feedback, b"not json", key=b"bad"
        )
    finally:
        await producer.stop()


async def test_every_dashboard_query_and_alert_rule_works_on_live_metrics(
    prometheus: PrometheusServer,
    backends: dict[str, int],
    gateway: tuple[App, int],
    kafka_settings: KafkaSettings,
) -> None:
    _, gateway_port = gateway
    prometheus.start({**backends, "gateway": gateway_port})
    traffic = Traffic(gateway_port)
    flowing = asyncio.create_task(traffic.run())
    await send_invalid_feedback(kafka_settings)
    await wait_until(lambda: traffic.answered >= 20, timeout_s=60)
    await overflow_publish_queue(gateway_port)
    pending = dict(dashboard_queries())

    async def every_query_has_data() -> bool:
        for where, expr in list(pending.items()):
            answer = await prometheus.query(expr)
            assert answer["status"] == "success", (where, expr, answer)
            if answer["data"]["result"]:
                del pending[where]
        return not pending

    try:
        with contextlib.suppress(AssertionError):
            await wait_until(every_query_has_data, timeout_s=DEADLINE_S, interval_s=2)
        rules = await wait_until(
            lambda: _evaluated_rules(prometheus), timeout_s=30, interval_s=1
        )
    finally:
        traffic.stop.set()
        await flowing

    assert pending == {}, f"panel queries without data: {pending}"
    for alert, expr in alert_expressions():
        answer = await prometheus.query(expr)
        assert answer["status"] == "success", (alert, answer)
    assert {r["name"]: r["health"] for r in rules} == {
        alert: "ok" for alert, _ in alert_expressions()
    }


async def _evaluated_rules(prometheus: PrometheusServer) -> list[dict[str, Any]]:
    """Every alert rule once it has been evaluated at least once."""
    groups = (await prometheus.get("/api/v1/rules"))["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    if not rules or any(r.get("lastEvaluation", "").startswith("0001") for r in rules):
        return []
    return rules
