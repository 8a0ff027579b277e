"""`python -m services.gateway`: run the gateway until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import sys

from services.common.lifecycle import install_stop_signals
from services.common.logs import configure_logging
from services.gateway.app import App
from services.gateway.settings import GatewaySettings


async def _run(settings: GatewaySettings) -> None:
    stop = asyncio.Event()
    install_stop_signals(stop)
    await App(settings).run(stop)


def main() -> int:
    settings: GatewaySettings = GatewaySettings.load()
    configure_logging(settings.logging, service="gateway")
    asyncio.run(_run(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
