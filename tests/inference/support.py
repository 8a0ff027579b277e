"""The real model, loaded once per test process, and an in-process server around it.

Both tests/inference and tests/trainer use these; a cached loader (not a fixture)
lets both share one load of about 20 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from services.inference.app import InferenceApp
from services.inference.model import LocalModel
from services.inference.settings import InferenceSettings, ModelSource
from tests.conftest import wait_until

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BASE_MODEL = "SmolLM2-135M-Instruct"


@functools.cache
def _loaded() -> tuple[LocalModel, Any]:
    import torch

    torch.set_num_threads(2)
    model = LocalModel.load(ModelSource(), device="cpu")
    # Serving loads adapters into the model; training must start from a bare copy.
    return model, copy.deepcopy(model.model)


def shared_model() -> LocalModel:
    """The bundled SmolLM2 on the CPU, loaded on first use."""
    return _loaded()[0]


def bare_base() -> tuple[Any, Any]:
    """The tokenizer and an untouched copy of the base (no adapter ever loaded)."""
    model, pristine = _loaded()
    return model.tokenizer, pristine


@contextlib.asynccontextmanager
async def running_server(
    model: LocalModel, adapters_dir: Path
) -> AsyncIterator[tuple[InferenceApp, str]]:
    """Serve `model` on a free loopback port; yields the app and its `/v1` URL."""
    settings = InferenceSettings(host="127.0.0.1", port=0, adapters_dir=adapters_dir)
    app = InferenceApp(settings, model=model)
    serving = asyncio.create_task(app.run(handle_signals=False))
    await wait_until(lambda: app.bound_port or serving.done(), timeout_s=10)
    root = f"http://127.0.0.1:{app.bound_port}"
    async with httpx.AsyncClient(base_url=root) as client:

        async def healthy() -> bool:
            return (await client.get("/healthz")).status_code == 200

        await wait_until(healthy, timeout_s=10)
    try:
        yield app, f"{root}/v1"
    finally:
        app.stop()
        await asyncio.wait_for(serving, timeout=15)
