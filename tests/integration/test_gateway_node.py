"""The Node.js `openai` package against the gateway, streaming and not."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import pytest

from services.common.kafka import Topics
from services.common.settings import KafkaSettings
from services.gateway.app import App
from tests.gateway.conftest import DEV_KEY

# The fixtures are shared with test_gateway.py: a served gateway and its stub.
from tests.integration.test_gateway import consume_all, served, upstream  # noqa: F401, F811

pytestmark = pytest.mark.integration

CLIENT_DIR = Path(__file__).resolve().parents[2] / "clients" / "node-openai"
NODE_TIMEOUT_S = 60


async def test_node_openai_client_round_trip(
    served: App,  # noqa: F811
    kafka_settings: KafkaSettings,
):
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node/npm are not installed: the Node.js client cannot run")
    # With node present, a missing `npm ci` is a failure, not a skip.
    assert (CLIENT_DIR / "node_modules" / "openai").is_dir(), (
        f"run `npm ci --prefix {CLIENT_DIR}` before the tests"
    )
    process = await asyncio.create_subprocess_exec(
        "node",
        str(CLIENT_DIR / "chat.mjs"),
        env={
            "PATH": os.environ["PATH"],
            "GATEWAY_URL": f"http://127.0.0.1:{served.port}/v1",
            "API_KEY": DEV_KEY,
            "MODEL": "support-bot",
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), NODE_TIMEOUT_S)
    assert process.returncode == 0, stderr.decode()
    result = json.loads(stdout)

    assert result["content"] == "You said: hello from node"
    assert result["header_id"] == result["id"]
    assert result["streamed_text"] == "You said: stream from node"
    assert len(result["stream_ids"]) == 1  # every chunk carries the interaction id
    # The stub counts one token per word of its answer.
    assert result["stream_usage"]["completion_tokens"] == 5
    topics = Topics(kafka_settings.topic_prefix)
    records = await consume_all(kafka_settings, topics.interactions, expected=2)
    ids = {json.loads(record.value)["interaction_id"] for record in records}
    assert ids == {result["id"], result["stream_ids"][0]}
