"""Builds the report for a period: reads PostgreSQL, writes HTML and PNG charts."""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from services.common import db
from services.common.settings import PostgresSettings
from services.report import queries, render

logger = logging.getLogger(__name__)

_PERIOD = re.compile(r"^(\d+)([hdw])$")
_UNITS = {"h": "hours", "d": "days", "w": "weeks"}


class ReportError(ValueError):
    """The report was asked for something it cannot do (e.g. a bad period)."""


def parse_period(text: str) -> timedelta:
    """`7d`, `24h`, `4w` as a timedelta."""
    match = _PERIOD.match(text.strip())
    if match is None or int(match.group(1)) == 0:
        raise ReportError(
            f"period {text!r}: expected a positive number and h, d or w, e.g. 7d"
        )
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


def bin_seconds(period: timedelta) -> int:
    """Chart bins: hourly up to two days, daily beyond."""
    return 3600 if period <= timedelta(days=2) else 86_400


@dataclass(frozen=True)
class ReportFiles:
    html: Path
    charts: list[Path]


@dataclass(frozen=True)
class ReportData:
    """Everything the report shows, read from PostgreSQL."""

    start: datetime
    end: datetime
    kpis: list[queries.VersionKpis]
    series: list[queries.SeriesPoint]
    decisions: list[queries.Decision]


async def read_report_data(
    settings: PostgresSettings, start: datetime, end: datetime
) -> ReportData:
    """Read KPIs, the chart series and the decisions between `start` and `end`."""
    pool = await db.create_pool(settings)
    try:
        async with pool.acquire() as connection:
            kpis = await queries.fetch_kpis(connection, start, end)
            series = await queries.fetch_series(
                connection, start, end, bin_seconds(end - start)
            )
            decisions = await queries.fetch_decisions(connection, start, end)
    finally:
        await pool.close()
    return ReportData(start, end, kpis, series, decisions)


def write_files(data: ReportData, out_dir: Path) -> ReportFiles:
    """Write `flywheel-report-<end>.html` and its PNG charts under `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"flywheel-report-{data.end:%Y%m%d-%H%M}"
    charts = [out_dir / f"{stem}-positive-rate.png", out_dir / f"{stem}-traffic.png"]
    render.positive_rate_chart(data.series, charts[0])
    render.traffic_chart(data.series, charts[1])
    html_path = out_dir / f"{stem}.html"
    html_path.write_text(
        render.page(
            start=data.start,
            end=data.end,
            kpis=data.kpis,
            decisions=data.decisions,
            charts=[chart.name for chart in charts],
        )
    )
    return ReportFiles(html_path, charts)


async def write_report(
    settings: PostgresSettings,
    *,
    since: timedelta,
    out_dir: Path,
    now: datetime | None = None,
) -> ReportFiles:
    """The report of the period `since` before `now`, written under `out_dir`."""
    end = now or datetime.now(UTC)
    data = await read_report_data(settings, end - since, end)
    files = await asyncio.to_thread(write_files, data, out_dir)
    logger.info(
        "report written path=%s versions=%d decisions=%d",
        files.html,
        len(data.kpis),
        len(data.decisions),
    )
    return files
