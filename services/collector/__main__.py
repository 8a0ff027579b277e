"""`python -m services.collector`: run the collector until SIGTERM or SIGINT."""

from __future__ import annotations

from services.collector.app import App
from services.collector.settings import CollectorSettings
from services.common.lifecycle import install_stop_signals, run
from services.common.logs import configure_logging


async def serve(settings: CollectorSettings) -> None:
    """Run one App with the process signals wired to its stop event."""
    app = App(settings)
    install_stop_signals(app.stopping)
    await app.run()


def main() -> None:
    """Load settings, configure logging, run until stopped (exit 0 on a clean stop)."""
    settings = CollectorSettings.load()
    configure_logging(settings.logging, service="collector")
    run(serve(settings))


if __name__ == "__main__":
    main()
