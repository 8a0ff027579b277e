"""Process lifecycle: one stop event, set by SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

logger = logging.getLogger(__name__)


def install_stop_signals(stop: asyncio.Event) -> None:
    """Make SIGTERM and SIGINT set `stop` (a second signal is left to the default)."""
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        logger.info("stop requested signal=%s", signal.Signals(signum).name)
        stop.set()
        loop.remove_signal_handler(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)


async def sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    """Wait `seconds`, or less when `stop` is set meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


def settle_heap(*, young_threshold: int | None = None) -> None:
    """Keep what start-up allocated out of every later garbage collection.

    It lives as long as the process, and a full collection would otherwise scan
    all of it again. `young_threshold` (net container allocations between two
    collections of the youngest generation; CPython's default is 700) suits a
    service whose work allocates many short-lived objects freed by reference
    counting, which a young collection would scan in vain while they live.
    """
    gc.collect()
    gc.freeze()
    if young_threshold is not None:
        _, middle, old = gc.get_threshold()
        gc.set_threshold(young_threshold, middle, old)


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when installed (several times faster), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)` on the loop `loop_factory` picks."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
