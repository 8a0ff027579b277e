"""Turns the report's numbers into PNG charts and one HTML page."""

from __future__ import annotations

import html
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from services.report.queries import Decision, SeriesPoint, VersionKpis

# Bins with fewer ratings than this are left out of the rate chart (gaps, not dips).
MIN_RATED_PER_BIN = 3


def positive_rate_chart(series: Sequence[SeriesPoint], path: Path) -> None:
    """Positive-feedback rate per model version over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_version: dict[str, list[tuple[datetime, float]]] = defaultdict(list)
    for point in series:
        if point.rated >= MIN_RATED_PER_BIN:
            by_version[point.version].append(
                (point.bin_start, point.positive / point.rated)
            )
    figure, axes = plt.subplots(figsize=(9, 4))
    for version, points in sorted(by_version.items()):
        times, rates = zip(*points, strict=True)
        axes.plot(times, rates, marker="o", label=version)
    axes.set_ylim(0, 1)
    axes.set_ylabel("positive-feedback rate")
    axes.set_title("Positive-feedback rate per model version")
    axes.grid(alpha=0.3)
    if by_version:
        axes.legend(loc="lower right")
    figure.autofmt_xdate()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def traffic_chart(series: Sequence[SeriesPoint], path: Path) -> None:
    """Requests per model version over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_version: dict[str, list[tuple[datetime, int]]] = defaultdict(list)
    for point in series:
        by_version[point.version].append((point.bin_start, point.requests))
    figure, axes = plt.subplots(figsize=(9, 3))
    for version, points in sorted(by_version.items()):
        times, counts = zip(*points, strict=True)
        axes.plot(times, counts, marker=".", label=version)
    axes.set_ylabel("requests per bin")
    axes.set_title("Traffic per model version")
    axes.grid(alpha=0.3)
    if by_version:
        axes.legend(loc="upper left")
    figure.autofmt_xdate()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _number(value: object) -> str:
    if isinstance(value, float):
        return f"{value:+.3f}"
    return "-" if value is None else html.escape(str(value))


def kpi_table(kpis: Sequence[VersionKpis]) -> str:
    header = (
        "<tr><th>route</th><th>model version</th><th>requests</th><th>error rate</th>"
        "<th>mean latency</th><th>p95 latency</th><th>cost (USD)</th><th>tokens</th>"
        "<th>feedback</th><th>rated</th><th>positive rate</th><th>corrections</th></tr>"
    )
    rows = [
        f"<tr><td>{html.escape(k.route)}</td><td>{html.escape(k.version)}</td>"
        f"<td>{k.requests}</td><td>{_percent(k.error_rate)}</td>"
        f"<td>{k.mean_latency_s:.3f} s</td><td>{k.p95_latency_s:.3f} s</td>"
        f"<td>{k.cost_usd:.4f}</td><td>{k.tokens}</td><td>{k.feedback}</td>"
        f"<td>{k.rated}</td><td>{_percent(k.positive_rate)}</td>"
        f"<td>{k.corrections}</td></tr>"
        for k in kpis
    ]
    return f"<table>{header}{''.join(rows)}</table>"


def decisions_table(decisions: Sequence[Decision]) -> str:
    if not decisions:
        return "<p>No experiment was decided in this period.</p>"
    header = (
        "<tr><th>when (UTC)</th><th>route</th><th>candidate</th><th>baseline</th>"
        "<th>action</th><th>by</th><th>lift</th><th>interval</th><th>p-value</th>"
        "<th>SRM p</th><th>reason</th></tr>"
    )
    rows = []
    for d in decisions:
        v = d.verdict or {}
        interval = (
            f"[{_number(v.get('lift_low'))}, {_number(v.get('lift_high'))}]"
            if "lift_low" in v
            else "-"
        )
        rows.append(
            f"<tr><td>{d.created_at:%Y-%m-%d %H:%M}</td>"
            f"<td>{html.escape(d.route)}</td><td>{html.escape(d.candidate)}</td>"
            f"<td>{html.escape(d.baseline)}</td><td>{html.escape(d.action)}</td>"
            f"<td>{html.escape(d.source)}</td><td>{_number(v.get('lift'))}</td>"
            f"<td>{interval}</td><td>{_number(v.get('p_value'))}</td>"
            f"<td>{_number(v.get('srm_p_value'))}</td>"
            f"<td>{html.escape(d.reason)}</td></tr>"
        )
    return f"<table>{header}{''.join(rows)}</table>"


STYLE = (
    "body{font-family:sans-serif;margin:2em;color:#222}"
    "table{border-collapse:collapse;margin:1em 0}"
    "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
    "th{background:#f3f3f3}td:nth-child(-n+2){text-align:left}"
)


def page(
    *,
    start: datetime,
    end: datetime,
    kpis: Sequence[VersionKpis],
    decisions: Sequence[Decision],
    charts: Sequence[str],
) -> str:
    images = "".join(
        f'<p><img src="{html.escape(name)}" alt="{html.escape(name)}"></p>'
        for name in charts
    )
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>Flywheel report {start:%Y-%m-%d} to {end:%Y-%m-%d}</title>"
        f"<style>{STYLE}</style></head><body>"
        f"<h1>Flywheel report</h1><p>From {start:%Y-%m-%d %H:%M} to "
        f"{end:%Y-%m-%d %H:%M} UTC.</p>"
        f"<h2>KPIs per model version</h2>{kpi_table(kpis)}{images}"
        f"<h2>Experiment decisions</h2>{decisions_table(decisions)}"
        "</body></html>\n"
    )
