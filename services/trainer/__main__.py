"""python -m services.trainer: the registry, control plane and training scheduler."""

from __future__ import annotations

import asyncio

from services.common.lifecycle import install_stop_signals
from services.common.logs import configure_logging
from services.trainer.app import App
from services.trainer.settings import TrainerSettings


async def main() -> None:
    settings = TrainerSettings.load()
    configure_logging(settings.logging, service="trainer")
    stop = asyncio.Event()
    install_stop_signals(stop)
    await App(settings).run(stop)


if __name__ == "__main__":
    asyncio.run(main())
