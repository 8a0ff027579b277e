"""`python -m services.analyzer`: run the analyzer until SIGTERM or SIGINT."""

from __future__ import annotations

from services.analyzer.settings import AnalyzerSettings
from services.analyzer.worker import run
from services.common.logs import configure_logging


def main() -> None:
    settings = AnalyzerSettings.load()
    configure_logging(settings.logging, service="analyzer")
    # The faust worker installs its own SIGTERM/SIGINT handlers, stops the app
    # cleanly (final offset commit, changelog flush) and exits the process.
    run(settings)


if __name__ == "__main__":
    main()
