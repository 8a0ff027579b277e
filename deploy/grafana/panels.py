"""Panel and dashboard helpers shared by the Flywheel dashboards (build.py)."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    VariableRefresh,
)

DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
RATE = "$__rate_interval"
ROUTE = 'route=~"$route"'


def query(expr: str, legend: str = "", ref_id: str = "A") -> prometheus.Dataquery:
    return (
        prometheus.Dataquery()
        .expr(expr)
        .legend_format(legend or "__auto")
        .ref_id(ref_id)
        .datasource(DATASOURCE)
    )


def graph(
    title: str, description: str, unit: str, *queries: tuple[str, str]
) -> timeseries.Panel:
    """A time series panel; each query is (expression, legend)."""
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .unit(unit)
        .datasource(DATASOURCE)
        .height(8)
        .span(12)
    )
    for index, (expr, legend) in enumerate(queries):
        panel = panel.with_target(query(expr, legend, chr(ord("A") + index)))
    return panel


def single(title: str, description: str, unit: str, expr: str) -> stat.Panel:
    return (
        stat.Panel()
        .title(title)
        .description(description)
        .unit(unit)
        .datasource(DATASOURCE)
        .height(4)
        .span(6)
        .with_target(query(expr))
    )


def ratio(numerator: str, denominator: str, by: str) -> str:
    """sum(rate(numerator)) / sum(rate(denominator)) per `by`, both on $route."""
    return (
        f"sum by ({by}) (rate({numerator}{{{ROUTE}}}[{RATE}]))\n"
        f"/ sum by ({by}) (rate({denominator}{{{ROUTE}}}[{RATE}]))"
    )


def new_dashboard(uid: str, title: str, description: str) -> db.Dashboard:
    route = (
        db.QueryVariable("route")
        .label("Route")
        .query("label_values(flywheel_gateway_requests_total, route)")
        .datasource(DATASOURCE)
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .include_all(True)
        .all_value(".*")
        .multi(True)
    )
    return (
        db.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(["flywheel"])
        .refresh("30s")
        .time("now-6h", "now")
        .timezone("browser")
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .with_variable(
            db.DatasourceVariable("datasource").label("Data source").type("prometheus")
        )
        .with_variable(route)
    )
