"""Run the inference server: `python -m services.inference`."""

from __future__ import annotations

import asyncio
import logging
import os
import sys

# Set before transformers is imported anywhere: never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from services.common.logs import configure_logging  # noqa: E402  # after the env
from services.inference.app import InferenceApp  # noqa: E402  # after the env
from services.inference.settings import InferenceSettings  # noqa: E402

logger = logging.getLogger("services.inference")


def main() -> int:
    settings: InferenceSettings = InferenceSettings.load()
    configure_logging(settings.logging, service="inference")
    exit_code = 0
    try:
        asyncio.run(InferenceApp(settings).run())
    except* Exception as failures:
        for failure in failures.exceptions:
            logger.error("inference server failed", exc_info=failure)
        exit_code = 1
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
