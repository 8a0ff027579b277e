"""Starts and stops the whole embedded stack: broker, PostgreSQL and every service.

Each service runs as its own process (`python -m services.<name>`) and talks to the
others only through Kafka, PostgreSQL and gRPC. Stopping sends SIGTERM to each, in
reverse start order, and SIGKILL after a grace period (a faust worker has been seen
ignoring SIGTERM).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from services.common import db, kafka
from services.common.embedded import (
    EmbeddedBroker,
    EmbeddedPostgres,
    free_port,
    stop_process,
)
from services.common.settings import KafkaSettings, PostgresSettings

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEV_API_KEY = "fw-dev-key"
DEV_CONTROL_TOKEN = "flywheel-dev-token"  # noqa: S105 - the documented local default


class StackError(RuntimeError):
    """A part of the stack did not start; the message names it and its log."""


@dataclass
class ServiceProcess:
    """One service's process, its log file and how to tell it is ready."""

    name: str
    env: dict[str, str]
    ready_url: str | None = None
    ready_port: int | None = None
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None


@dataclass
class StackOptions:
    """What the stack needs to know: where data goes and how the trainer behaves."""

    data_dir: Path
    route: str = "capitals-bot"
    topic_prefix: str = "flywheel."
    db_schema: str = "flywheel"
    min_new_rated: int = 200
    rollout_steps: list[int] = field(default_factory=lambda: [5, 25, 50])
    training_epochs: int = 6
    training_max_steps: int | None = None
    learning_rate: float = 5e-4
    analyzer_min_rated: int = 30
    analyzer_max_rated: int = 400
    analyzer_interval_s: float = 5.0
    max_tokens: int = 32
    extra_env: dict[str, str] = field(default_factory=dict)


class Stack:
    """The embedded default, up and running, with its addresses."""

    def __init__(
        self, options: StackOptions, *, on_progress: Callable[[str], None] = print
    ):
        self.options = options
        self.on_progress = on_progress
        data = options.data_dir.resolve()
        self.data_dir = data
        self.ports = _ports_for(data)
        self.broker = EmbeddedBroker(data / "kafka", port=self.ports["kafka"])
        self.postgres = EmbeddedPostgres(data / "postgres", port=self.ports["postgres"])
        self.services: list[ServiceProcess] = []
        # A fresh pseudonymization key per stack: user ids cannot be linked across runs.
        self.pseudonym_key = secrets.token_hex(32)

    # -- addresses -------------------------------------------------------------

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['gateway']}/v1"

    @property
    def inference_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['inference']}/v1"

    @property
    def control_address(self) -> str:
        return f"127.0.0.1:{self.ports['trainer_grpc']}"

    def metrics_url(self, service: str) -> str:
        if service == "gateway":
            return f"http://127.0.0.1:{self.ports['gateway']}/metrics"
        return f"http://127.0.0.1:{self.ports[f'{service}_metrics']}/metrics"

    @property
    def kafka_settings(self) -> KafkaSettings:
        return KafkaSettings(
            bootstrap_servers=self.broker.bootstrap_servers,
            topic_prefix=self.options.topic_prefix,
        )

    @property
    def postgres_settings(self) -> PostgresSettings:
        return PostgresSettings(dsn=self.postgres.dsn, db_schema=self.options.db_schema)

    # -- environment -------------------------------------------------------------

    def shared_env(self) -> dict[str, str]:
        # The stack sets every service's addresses itself: the caller's FLYWHEEL_
        # variables are dropped, except the content encryption keys, passed on.
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("FLYWHEEL_")
            or key.startswith("FLYWHEEL_ENCRYPTION__")
        }
        env.update(
            {
                "PYTHONUNBUFFERED": "1",
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false",
                "FLYWHEEL_KAFKA__BOOTSTRAP_SERVERS": self.broker.bootstrap_servers,
                "FLYWHEEL_KAFKA__TOPIC_PREFIX": self.options.topic_prefix,
                # One record per batch: see KafkaSettings.producer_max_batch_bytes.
                "FLYWHEEL_KAFKA__PRODUCER_MAX_BATCH_BYTES": "1",
                "FLYWHEEL_POSTGRES__DSN": self.postgres.dsn,
                "FLYWHEEL_POSTGRES__DB_SCHEMA": self.options.db_schema,
                "FLYWHEEL_CONTROL__ADDRESS": self.control_address,
                "FLYWHEEL_CONTROL__TOKEN": DEV_CONTROL_TOKEN,
            }
        )
        env.update(self.options.extra_env)
        return env

    def service_specs(self) -> list[ServiceProcess]:
        """Every service in start order, with its own settings as variables."""
        o, p, data = self.options, self.ports, self.data_dir
        adapters, datasets = str(data / "adapters"), str(data / "datasets")
        trainer_env = {
            "FLYWHEEL_TRAINER_GRPC_PORT": str(p["trainer_grpc"]),
            "FLYWHEEL_TRAINER_METRICS_PORT": str(p["trainer_metrics"]),
            "FLYWHEEL_TRAINER_ROUTE": o.route,
            "FLYWHEEL_TRAINER_INFERENCE_BASE_URL": self.inference_url,
            "FLYWHEEL_TRAINER_ADAPTERS_DIR": adapters,
            "FLYWHEEL_TRAINER_DATASETS_DIR": datasets,
            "FLYWHEEL_TRAINER_MIN_NEW_RATED": str(o.min_new_rated),
            "FLYWHEEL_TRAINER_ROLLOUT_STEPS": json.dumps(o.rollout_steps),
            "FLYWHEEL_TRAINER_TRAINING__EPOCHS": str(o.training_epochs),
            "FLYWHEEL_TRAINER_TRAINING__LEARNING_RATE": str(o.learning_rate),
            "FLYWHEEL_TRAINER_STAGING__MAX_TOKENS": str(o.max_tokens),
        }
        if o.training_max_steps:
            trainer_env["FLYWHEEL_TRAINER_TRAINING__MAX_STEPS"] = str(
                o.training_max_steps
            )
        return [
            ServiceProcess(
                "inference",
                {
                    "FLYWHEEL_INFERENCE_PORT": str(p["inference"]),
                    "FLYWHEEL_INFERENCE_ADAPTERS_DIR": adapters,
                    "FLYWHEEL_INFERENCE_MODEL__DEFAULT_MAX_TOKENS": str(o.max_tokens),
                },
                ready_url=f"http://127.0.0.1:{p['inference']}/healthz",
            ),
            ServiceProcess("trainer", trainer_env, ready_port=p["trainer_grpc"]),
            ServiceProcess(
                "collector",
                {"FLYWHEEL_COLLECTOR_METRICS_PORT": str(p["collector_metrics"])},
                ready_url=self.metrics_url("collector"),
            ),
            ServiceProcess(
                "analyzer",
                {
                    "FLYWHEEL_ANALYZER_METRICS_PORT": str(p["analyzer_metrics"]),
                    "FLYWHEEL_ANALYZER_APP_ID": f"analyzer-{o.db_schema}",
                    "FLYWHEEL_ANALYZER_EXPERIMENTS__MIN_RATED_PER_ARM": str(
                        o.analyzer_min_rated
                    ),
                    "FLYWHEEL_ANALYZER_EXPERIMENTS__MIN_REQUESTS_PER_ARM": str(
                        o.analyzer_min_rated
                    ),
                    "FLYWHEEL_ANALYZER_EXPERIMENTS__MAX_RATED_PER_ARM": str(
                        o.analyzer_max_rated
                    ),
                    "FLYWHEEL_ANALYZER_EXPERIMENTS__EVALUATE_INTERVAL_S": str(
                        o.analyzer_interval_s
                    ),
                    "FLYWHEEL_ANALYZER_DATA_DIR": str(data / "analyzer"),
                    # NOTE: Tansu 0.6.0 reports a topic's end offset as the last batch's
                    # first offset + 1, so faust stops restoring a changelog early and
                    # loses the tail of a multi-record batch. One record per batch keeps
                    # the reported end right; a real Kafka cluster needs no such thing.
                    "FLYWHEEL_ANALYZER_PRODUCER_MAX_BATCH_BYTES": "1",
                },
                ready_url=self.metrics_url("analyzer"),
            ),
            ServiceProcess(
                "gateway",
                {
                    "FLYWHEEL_GATEWAY_PORT": str(p["gateway"]),
                    "FLYWHEEL_GATEWAY_PSEUDONYM_KEY": self.pseudonym_key,
                    "FLYWHEEL_GATEWAY_SPOOL_DIR": str(data / "gateway-spool"),
                },
                ready_url=f"http://127.0.0.1:{p['gateway']}/healthz",
            ),
        ]

    # -- lifecycle -----------------------------------------------------------------

    async def start(self, *, timeout_s: float = 180.0) -> None:
        """Infrastructure, topics, schema, then each service when the last is ready."""
        (self.data_dir / "logs").mkdir(parents=True, exist_ok=True)
        self.on_progress("starting Kafka-compatible broker (Tansu) and PostgreSQL")
        await asyncio.to_thread(self.broker.start)
        await asyncio.to_thread(self.postgres.start)
        await kafka.wait_for_broker(self.kafka_settings)
        await kafka.ensure_topics(
            self.kafka_settings, kafka.Topics(self.options.topic_prefix).all()
        )
        await db.migrate(self.postgres_settings)
        env = self.shared_env()
        for spec in self.service_specs():
            self.on_progress(f"starting {spec.name}")
            self._spawn(spec, env)
            await self._wait_ready(spec, timeout_s)
        self.on_progress("stack ready: gateway at " + self.gateway_url)

    def _spawn(self, spec: ServiceProcess, env: dict[str, str]) -> None:
        spec.log_path = self.data_dir / "logs" / f"{spec.name}.log"
        with spec.log_path.open("ab") as log:
            spec.process = subprocess.Popen(
                [sys.executable, "-m", f"services.{spec.name}"],
                env={**env, **spec.env},
                cwd=REPO_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.services.append(spec)

    async def _wait_ready(self, spec: ServiceProcess, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(timeout=2) as client:
            while time.monotonic() < deadline:
                assert spec.process is not None
                if spec.process.poll() is not None:
                    raise StackError(
                        f"{spec.name} exited with {spec.process.returncode}; "
                        f"see {spec.log_path}:\n{_tail(spec.log_path)}"
                    )
                if await _is_ready(client, spec):
                    return
                await asyncio.sleep(0.3)
        raise StackError(
            f"{spec.name} not ready in {timeout_s:.0f} s; see {spec.log_path}"
        )

    def check_alive(self) -> None:
        """Raise StackError when a service died while the stack should be running."""
        for spec in self.services:
            if spec.process is not None and spec.process.poll() is not None:
                raise StackError(
                    f"{spec.name} exited with {spec.process.returncode}; "
                    f"see {spec.log_path}:\n{_tail(spec.log_path)}"
                )

    def stop(self) -> None:
        """Stop services in reverse order, then the infrastructure. Idempotent."""
        for spec in reversed(self.services):
            if spec.process is not None:
                stop_process(spec.process, grace_s=15.0)
        self.services.clear()
        self.broker.stop()
        self.postgres.stop()


PORT_NAMES = (
    "kafka",
    "postgres",
    "gateway",
    "inference",
    "trainer_grpc",
    "trainer_metrics",
    "collector_metrics",
    "analyzer_metrics",
)


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ports_for(data_dir: Path) -> dict[str, int]:
    """The stack's ports, chosen once per data folder and kept in `ports.json`.

    The routing table in PostgreSQL names the inference server's URL, so a restart
    on the same data must come back on the same ports.
    """
    path = data_dir / "ports.json"
    if path.exists():
        ports: dict[str, int] = json.loads(path.read_text())
        busy = [
            f"{name}={port}" for name, port in ports.items() if not _port_is_free(port)
        ]
        if busy:
            raise StackError(
                f"ports kept in {path} are in use ({', '.join(busy)}): stop what holds "
                "them (another `flywheel up` on this data?), or delete the file to "
                "pick new ones (routes then need their upstream URL updated)"
            )
        return ports
    ports = {name: free_port() for name in PORT_NAMES}
    data_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ports, indent=2))
    return ports


async def _is_ready(client: httpx.AsyncClient, spec: ServiceProcess) -> bool:
    if spec.ready_url:
        with contextlib.suppress(httpx.HTTPError):
            return (await client.get(spec.ready_url)).status_code == 200
        return False
    assert spec.ready_port is not None
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", spec.ready_port)
    except OSError:
        return False
    writer.close()
    return True


def _tail(path: Path | None, lines: int = 25) -> str:
    if path is None or not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
