"""`python -m services.gateway`: run the gateway until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable

from services.common.lifecycle import install_stop_signals
from services.common.logs import configure_logging
from services.gateway.app import App
from services.gateway.settings import GatewaySettings


async def _run(settings: GatewaySettings) -> None:
    stop = asyncio.Event()
    install_stop_signals(stop)
    await App(settings).run(stop)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when installed (several times faster), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main() -> int:
    settings: GatewaySettings = GatewaySettings.load()
    configure_logging(settings.logging, service="gateway")
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(_run(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
