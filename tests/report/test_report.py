"""`flywheel report` against a real PostgreSQL schema filled with known rows."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from services.common.settings import PostgresSettings
from services.report.__main__ import build_parser, run
from services.report.report import ReportError, parse_period, write_report

NOW = datetime(2025, 3, 10, 12, 0, tzinfo=UTC)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


async def add_interaction(
    pool: Any, *, version: str, at: datetime, error: bool = False
) -> uuid.UUID:
    interaction_id = uuid.uuid4()
    await pool.execute(
        """INSERT INTO interactions (event_id, interaction_id, project_id, route,
               variant, model_version, request_messages, error, cost_usd, latency_s,
               prompt_tokens, completion_tokens, started_at, finished_at)
           VALUES ($1, $2, 'default', 'capitals-bot', $3, $3, $4, $5, 0.001, 0.5,
               10, 5, $6, $6)""",
        uuid.uuid4(),
        interaction_id,
        version,
        [{"role": "user", "content": "q"}],
        {"type": "upstream", "message": "boom"} if error else None,
        at,
    )
    return interaction_id


async def add_feedback(
    pool: Any, interaction_id: uuid.UUID, kind: str, value: float | None
) -> None:
    await pool.execute(
        """INSERT INTO feedback (event_id, interaction_id, project_id, kind, value,
               text, created_at) VALUES ($1, $2, 'default', $3, $4, $5, $6)""",
        uuid.uuid4(),
        interaction_id,
        kind,
        value,
        "better answer" if kind == "correction" else None,
        NOW,
    )


async def add_decision(pool: Any, *, at: datetime, action: str) -> None:
    for version in ("bot-v1", "bot-v2"):
        await pool.execute(
            """INSERT INTO model_versions (version_id, route, base_model, upstream_url,
                   state) VALUES ($1, 'capitals-bot', 'smol', 'http://x', 'canary')
               ON CONFLICT DO NOTHING""",
            version,
        )
    await pool.execute(
        """INSERT INTO rollouts (rollout_id, route, candidate, baseline, steps, state)
           VALUES ('r1', 'capitals-bot', 'bot-v2', 'bot-v1', '[50]', 'rolled_back')
           ON CONFLICT DO NOTHING"""
    )
    verdict = {"lift": -0.21, "lift_low": -0.35, "lift_high": -0.07, "p_value": 0.004}
    await pool.execute(
        """INSERT INTO rollout_decisions (rollout_id, action, source, reason, verdict,
               created_at) VALUES ('r1', $1, 'analyzer', 'treatment worse', $2, $3)""",
        action,
        verdict,
        at,
    )


async def test_report_shows_kpis_per_version_and_the_decisions_of_the_period(
    pg_pool: Any, pg_settings: PostgresSettings, tmp_path: Path
) -> None:
    day_ago = NOW - timedelta(days=1)
    for index in range(4):  # v1: 4 thumbs, 3 up -> 75%
        interaction = await add_interaction(pg_pool, version="bot-v1", at=day_ago)
        await add_feedback(pg_pool, interaction, "thumbs", 1 if index else -1)
    for index in range(5):  # v2: 5 scores, 2 >= 0.5 -> 40%, one error, corrections
        interaction = await add_interaction(
            pg_pool, version="bot-v2", at=day_ago, error=index == 0
        )
        await add_feedback(pg_pool, interaction, "score", 0.9 if index < 2 else 0.1)
        await add_feedback(pg_pool, interaction, "correction", None)
    old = await add_interaction(pg_pool, version="bot-v0", at=NOW - timedelta(days=9))
    await add_feedback(pg_pool, old, "thumbs", 1)
    await add_decision(pg_pool, at=day_ago, action="rolled_back")
    await add_decision(pg_pool, at=NOW - timedelta(days=10), action="started")

    files = await write_report(
        pg_settings, since=timedelta(days=7), out_dir=tmp_path, now=NOW
    )

    page = files.html.read_text()
    assert "bot-v1" in page and "bot-v2" in page
    assert "bot-v0" not in page  # older than the period
    assert "<td>75.0%</td>" in page and "<td>40.0%</td>" in page
    assert "<td>20.0%</td>" in page  # v2 error rate
    assert "rolled_back" in page and "treatment worse" in page
    assert "-0.210" in page and "[-0.350, -0.070]" in page
    assert "started" not in page  # decided before the period
    for chart in files.charts:
        assert chart.read_bytes().startswith(PNG_MAGIC)
        assert chart.name in page


async def test_report_of_an_empty_period_says_so(
    pg_settings: PostgresSettings, tmp_path: Path
) -> None:
    files = await write_report(
        pg_settings, since=timedelta(hours=24), out_dir=tmp_path, now=NOW
    )

    assert "No experiment was decided" in files.html.read_text()


def test_command_line_writes_the_report(
    pg_settings: PostgresSettings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = build_parser().parse_args(
        [
            "--since",
            "2d",
            "--dsn",
            pg_settings.dsn.get_secret_value(),
            "--schema",
            pg_settings.db_schema,
            "--out",
            str(tmp_path),
        ]
    )

    code = run(args)

    printed = Path(capsys.readouterr().out.strip())
    assert code == 0 and printed.exists() and printed.parent == tmp_path


@pytest.mark.parametrize(
    ("text", "expected"),
    [("7d", timedelta(days=7)), ("24h", timedelta(hours=24)), ("4w", timedelta(28))],
)
def test_periods_parse(text: str, expected: timedelta) -> None:
    assert parse_period(text) == expected


@pytest.mark.parametrize("text", ["", "7", "0d", "7x", "-1d"])
def test_bad_periods_are_refused(text: str) -> None:
    with pytest.raises(ReportError):
        parse_period(text)
