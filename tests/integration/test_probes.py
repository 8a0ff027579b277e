"""/livez, /readyz and /metrics of the collector, analyzer and trainer.

Each service runs against the real broker and PostgreSQL; "PostgreSQL unreachable"
is a DSN pointing at a loopback port nobody listens on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from services.analyzer.app import Analyzer
from services.analyzer.settings import AnalyzerSettings
from services.analyzer.worker import analyzer_problems
from services.common.dependencies import kafka_problems
from services.common.embedded import free_port
from services.common.settings import KafkaSettings, PostgresSettings
from services.trainer.app import App as TrainerApp
from services.trainer.settings import TrainerSettings
from tests.conftest import wait_until
from tests.integration.test_analyzer import AnalyzerProcess
from tests.integration.test_collector import collector_settings, start_app, stop_app

pytestmark = pytest.mark.integration

Answer = tuple[int, dict[str, Any]]


async def probe(port: int, path: str) -> Answer | None:
    """(status, JSON body) of GET path, or None while nothing listens."""
    try:
        async with httpx.AsyncClient(timeout=10.0, trust_env=False) as client:
            response = await client.get(f"http://127.0.0.1:{port}{path}")
    except httpx.TransportError:
        return None
    return response.status_code, response.json()


async def scrape(port: int) -> str:
    async with httpx.AsyncClient(timeout=10.0, trust_env=False) as client:
        response = await client.get(f"http://127.0.0.1:{port}/metrics")
    response.raise_for_status()
    return response.text


async def wait_for_answer(
    port: int, path: str, accept: Callable[[Answer], bool] = lambda _: True
) -> Answer:
    async def answered() -> Answer | None:
        answer = await probe(port, path)
        return answer if answer is not None and accept(answer) else None

    result: Answer = await wait_until(answered, timeout_s=60.0, interval_s=0.2)
    return result


def unreachable(pg_settings: PostgresSettings) -> PostgresSettings:
    """The same schema, on a loopback port where no PostgreSQL listens."""
    dsn = f"postgresql://flywheel@127.0.0.1:{free_port()}/flywheel"
    return pg_settings.model_copy(update={"dsn": SecretStr(dsn)})


def problems_of(answer: Answer) -> list[str]:
    problems: list[str] = answer[1]["problems"]
    return problems


# --- collector ----------------------------------------------------------------------


async def test_collector_is_unready_while_postgres_is_unreachable(
    kafka_settings: KafkaSettings, pg_settings: PostgresSettings
) -> None:
    port = free_port()
    settings = collector_settings(
        kafka_settings, unreachable(pg_settings), metrics_port=port
    )
    app, task = await start_app(settings)

    try:
        ready = await wait_for_answer(port, "/readyz")
        live = await wait_for_answer(port, "/livez")
    finally:
        await stop_app(app, task)

    assert ready[0] == 503
    assert ready[1]["status"] == "unavailable"
    assert any(p.startswith("postgres: not connected yet") for p in problems_of(ready))
    assert any(
        p.startswith("kafka: the consumer has not joined") for p in ready[1]["problems"]
    )
    # Waiting on PostgreSQL is not being stuck: no restart would help.
    assert live == (200, {"status": "ok", "problems": []})


async def test_collector_is_ready_once_in_its_group_with_postgres(
    kafka_settings: KafkaSettings, pg_settings: PostgresSettings
) -> None:
    port = free_port()
    settings = collector_settings(kafka_settings, pg_settings, metrics_port=port)
    app, task = await start_app(settings)

    try:
        ready = await wait_for_answer(port, "/readyz", lambda a: a[0] == 200)
        live = await probe(port, "/livez")
        metrics = await scrape(port)
    finally:
        await stop_app(app, task)

    assert ready[1] == {"status": "ok", "problems": []}
    assert app.membership.joined
    assert live == (200, {"status": "ok", "problems": []})
    assert "flywheel_collector_events_consumed_total" in metrics


# --- trainer ------------------------------------------------------------------------


def trainer_settings(pg_settings: PostgresSettings) -> TrainerSettings:
    return TrainerSettings(
        postgres=pg_settings,
        grpc_port=free_port(),
        metrics_port=free_port(),
        route="bot",
        min_new_rated=1_000_000,
        token_count="approx",
        inference_base_url="http://127.0.0.1:9/v1",
    )


async def run_trainer(
    settings: TrainerSettings, until: Callable[[Answer], bool]
) -> tuple[Answer, Answer | None, str]:
    """Run the trainer in-process: /readyz once `until` holds, /livez, /metrics."""
    stop = asyncio.Event()
    task = asyncio.create_task(TrainerApp(settings).run(stop))
    port = settings.metrics_port
    try:
        ready = await wait_for_answer(port, "/readyz", until)
        live = await probe(port, "/livez")
        metrics = await scrape(port)
    finally:
        stop.set()
        async with asyncio.timeout(30):
            await task
    return ready, live, metrics


async def test_trainer_is_unready_while_postgres_is_unreachable(
    pg_settings: PostgresSettings,
) -> None:
    settings = trainer_settings(unreachable(pg_settings))

    ready, live, _ = await run_trainer(settings, lambda _: True)

    assert ready[0] == 503
    problems = problems_of(ready)
    assert any(p.startswith("postgres: not connected yet") for p in problems)
    assert "control_plane: the gRPC control server is not serving" in problems
    assert live == (200, {"status": "ok", "problems": []})


async def test_trainer_is_ready_once_postgres_answers_and_grpc_serves(
    pg_settings: PostgresSettings,
) -> None:
    settings = trainer_settings(pg_settings)

    ready, live, metrics = await run_trainer(settings, lambda a: a[0] == 200)

    assert ready[1] == {"status": "ok", "problems": []}
    assert live == (200, {"status": "ok", "problems": []})
    assert "python_info" in metrics


# --- analyzer -----------------------------------------------------------------------


async def test_kafka_check_names_an_unreachable_broker(
    kafka_settings: KafkaSettings,
) -> None:
    closed = kafka_settings.model_copy(
        update={"bootstrap_servers": f"127.0.0.1:{free_port()}"}
    )

    down = await kafka_problems(closed, client_id="probe-test")
    up = await kafka_problems(kafka_settings, client_id="probe-test")

    assert len(down) == 1 and closed.bootstrap_servers in down[0]
    assert up == []


def test_analyzer_not_started_is_unready_with_the_reason(
    kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    settings = AnalyzerSettings(kafka=kafka_settings, data_dir=str(tmp_path))

    problems = analyzer_problems(Analyzer(settings).app)

    assert problems == ["the faust worker is init"]


async def test_analyzer_is_ready_once_its_tables_recovered(
    kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    analyzer = AnalyzerProcess(kafka_settings, tmp_path)
    port = analyzer.metrics_port
    seen: list[Answer] = []

    def record(answer: Answer) -> bool:
        seen.append(answer)
        return answer[0] == 200

    analyzer.start()
    try:
        ready = await wait_for_answer(port, "/readyz", record)
        live = await probe(port, "/livez")
        metrics = await scrape(port)
    finally:
        assert analyzer.stop() == 0, analyzer.log_tail()

    assert ready[1] == {"status": "ok", "problems": []}
    # Every answer before that was a 503 that said why.
    assert all(status == 503 and body["problems"] for status, body in seen[:-1])
    assert live == (200, {"status": "ok", "problems": []})
    assert "flywheel_analyzer" in metrics
