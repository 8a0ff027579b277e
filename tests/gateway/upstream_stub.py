"""A real local HTTP server that answers like OpenAI's chat completions API.

The last user message steers it: `fail:<status>` answers that error status,
`fail-model:<model>:<status>` does so only for requests for that model,
`flaky:<token>:<n>:<status>` fails the first n requests carrying that token, `hang`
never answers (for timeouts), `broken-stream` cuts a stream off mid-way,
`cut-body:<token>` cuts a non-streamed answer off mid-body, `bad-chunk` streams a
chunk that is not JSON, `long:<n>` answers n characters,
`slow-stream` stops after its first word until released; anything
else is echoed back as "You said: <message>".
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from services.common.embedded import free_port
from tests.conftest import wait_until


class UpstreamStub:
    """An OpenAI-like upstream on 127.0.0.1 that records what it was sent."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.flaky_seen: dict[str, int] = {}
        self.port = free_port()
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self.release_hang = asyncio.Event()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> None:
        app = Starlette(
            routes=[Route("/v1/chat/completions", self._chat, methods=["POST"])]
        )
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, lifespan="off", log_config=None
        )
        self._server = uvicorn.Server(config)
        self._server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
        self._task = asyncio.create_task(self._server.serve())
        await wait_until(lambda: self._server is not None and self._server.started)

    async def stop(self) -> None:
        self.release_hang.set()
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task

    async def _chat(self, request: Request) -> Response:
        body = orjson.loads(await request.body())
        self.requests.append({"body": body, "headers": dict(request.headers)})
        prompt = next(
            (m["content"] for m in reversed(body["messages"]) if m["role"] == "user"),
            "",
        )
        status = self._failure_status(body, prompt)
        if status is not None:
            error = {
                "message": f"stub failure {status}",
                "type": "server_error",
                "param": None,
                "code": "stub_failure",
            }
            return Response(
                orjson.dumps({"error": error}), status, media_type="application/json"
            )
        if prompt == "hang":
            await self.release_hang.wait()
        answer = f"You said: {prompt}"
        if prompt.startswith("long:"):
            answer = "a" * int(prompt.removeprefix("long:"))
        if prompt.startswith("cut-body:") and not body.get("stream"):
            whole = orjson.dumps(_completion(body, answer))
            return StreamingResponse(
                _cut_off(whole),
                media_type="application/json",
                headers={"content-length": str(len(whole))},
            )
        if body.get("stream"):
            return StreamingResponse(
                self._chunks(
                    body,
                    answer,
                    broken=prompt == "broken-stream",
                    bad_chunk=prompt == "bad-chunk",
                ),
                media_type="text/event-stream",
            )
        return Response(
            orjson.dumps(_completion(body, answer)), media_type="application/json"
        )

    def _failure_status(self, body: dict[str, Any], prompt: str) -> int | None:
        kind, _, rest = prompt.partition(":")
        if kind == "fail":
            return int(rest)
        if kind == "fail-model":
            model, _, status = rest.rpartition(":")
            return int(status) if body.get("model") == model else None
        if kind == "flaky":
            token, failures, status = rest.split(":")
            seen = self.flaky_seen[token] = self.flaky_seen.get(token, 0) + 1
            return int(status) if seen <= int(failures) else None
        return None

    async def _chunks(
        self, body: dict[str, Any], answer: str, *, broken: bool, bad_chunk: bool
    ) -> AsyncIterator[bytes]:
        base = {
            "id": "chatcmpl-stub",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": body["model"],
        }
        with_usage = (body.get("stream_options") or {}).get("include_usage") is True
        first = {
            **base,
            "choices": [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": ""},
                    "finish_reason": None,
                }
            ],
        }
        yield _sse(first, with_usage)
        words = answer.split(" ")
        for position, word in enumerate(words):
            piece = word if position == 0 else " " + word
            yield _sse(
                {
                    **base,
                    "choices": [
                        {"index": 0, "delta": {"content": piece}, "finish_reason": None}
                    ],
                },
                with_usage,
            )
            if broken and position == 1:
                raise RuntimeError("stub cut the stream off")
            if bad_chunk and position == 0:
                yield b"data: {not json\n\n"
            if body["messages"][-1]["content"] == "slow-stream" and position == 0:
                await self.release_hang.wait()
        yield _sse(
            {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
            with_usage,
        )
        if with_usage:
            yield (
                b"data: "
                + orjson.dumps({**base, "choices": [], "usage": _usage(answer)})
                + b"\n\n"
            )
        yield b"data: [DONE]\n\n"


async def _cut_off(whole: bytes) -> AsyncIterator[bytes]:
    """Half of `whole`, then the connection breaks (Content-Length promised all)."""
    yield whole[: len(whole) // 2]
    raise RuntimeError("stub cut the body off")


def _usage(answer: str) -> dict[str, int]:
    completion = len(answer.split())
    return {
        "prompt_tokens": 11,
        "completion_tokens": completion,
        "total_tokens": 11 + completion,
    }


def _sse(chunk: dict[str, Any], with_usage: bool) -> bytes:
    if with_usage:
        chunk = {**chunk, "usage": None}
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def _completion(body: dict[str, Any], answer: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "created": 1,
        "model": body["model"],
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": answer},
                "finish_reason": "stop",
            }
        ],
        "usage": _usage(answer),
    }
