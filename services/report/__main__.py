"""python -m services.report --since 7d [--dsn DSN] [--schema S] [--out DIR]"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from services.common.logs import configure_logging
from services.report.report import ReportError, parse_period, write_report
from services.report.settings import ReportSettings


def build_parser() -> argparse.ArgumentParser:
    """The options of `flywheel report` (also used by services/cli.py)."""
    parser = argparse.ArgumentParser(
        prog="flywheel report",
        description="KPIs per model version and the experiments decided in a period, "
        "as HTML with PNG charts.",
    )
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--since", default="7d", help="period: 24h, 7d, 4w (7d)")
    parser.add_argument("--dsn", help="PostgreSQL DSN (else FLYWHEEL_POSTGRES__DSN)")
    parser.add_argument("--schema", help="schema (else FLYWHEEL_POSTGRES__DB_SCHEMA)")
    parser.add_argument("--out", type=Path, help="output folder (reports)")


def run(args: argparse.Namespace) -> int:
    """Write the report the parsed `args` ask for; prints the HTML file's path."""
    postgres: dict[str, Any] = {}
    if args.dsn:
        postgres["dsn"] = args.dsn
    if args.schema:
        postgres["db_schema"] = args.schema
    settings = ReportSettings.load(postgres=postgres)
    configure_logging(settings.logging, service="report")
    try:
        since = parse_period(args.since)
    except ReportError as error:
        print(f"flywheel report: {error}", file=sys.stderr)
        return 2
    out_dir = args.out or Path(settings.out_dir)
    files = asyncio.run(write_report(settings.postgres, since=since, out_dir=out_dir))
    print(files.html)
    return 0


if __name__ == "__main__":
    sys.exit(run(build_parser().parse_args()))
