"""The inference server: OpenAI-compatible HTTP routes and the process lifecycle.

The model works in one dedicated worker thread, so generations run one at a time in
arrival order while the event loop keeps answering `/healthz` and `/v1/models`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from services.common.lifecycle import install_stop_signals
from services.inference.adapters import AdapterCatalog, AdapterRef
from services.inference.errors import (
    InferenceError,
    InvalidRequestError,
    ModelNotFoundError,
    ModelNotReadyError,
)
from services.inference.model import GenerationParams, LocalModel
from services.inference.protocol import (
    ChatCompletionRequest,
    chat_messages,
    chunk_body,
    completion_body,
    parse_request,
    usage_body,
)
from services.inference.settings import InferenceSettings

logger = logging.getLogger(__name__)

T = TypeVar("T")


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: our stop event decides when to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class InferenceApp:
    """Serves the base model and its LoRA adapters over OpenAI's chat API."""

    def __init__(self, settings: InferenceSettings, *, model: LocalModel | None = None):
        self.settings = settings
        self.model = model
        self.catalog = AdapterCatalog(settings.adapters_dir)
        self.bound_port: int | None = None
        self._stop = asyncio.Event()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self.asgi = Starlette(
            routes=[
                Route("/healthz", self.healthz),
                Route("/v1/models", self.list_models),
                Route("/v1/models/{model_id:path}", self.retrieve_model),
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            ],
            exception_handlers={InferenceError: _error_response},
        )

    async def run(self, *, handle_signals: bool = True) -> None:
        """Serve until `stop()` (or SIGTERM/SIGINT) or the first failure."""
        if handle_signals:
            install_stop_signals(self._stop)
        logger.info(
            "inference server starting settings=%s", self.settings.model_dump_json()
        )

        # Listen first, so /healthz answers 503 while the model loads.
        listener = self._bind()
        server = _Server(
            uvicorn.Config(
                self.asgi,
                log_config=None,
                access_log=False,
                lifespan="off",
                timeout_graceful_shutdown=int(self.settings.shutdown_grace_s),
            )
        )
        try:
            async with asyncio.TaskGroup() as group:
                serving = group.create_task(server.serve(sockets=[listener]))
                serving.add_done_callback(lambda _: self._stop.set())
                if self.model is None:
                    group.create_task(self._load_model())

                # Wait for a stop request; a failing sibling cancels this wait.
                await self._stop.wait()
                server.should_exit = True
        finally:
            # NOTE: a generation in progress finishes in its thread (max_tokens bounds
            # it); queued ones are dropped.
            self._worker.shutdown(wait=False, cancel_futures=True)
            listener.close()
            logger.info("inference server stopped")

    def stop(self) -> None:
        """Ask `run()` to finish; idempotent."""
        self._stop.set()

    def _bind(self) -> socket.socket:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.settings.host, self.settings.port))
        listener.listen(128)
        listener.setblocking(False)
        self.bound_port = int(listener.getsockname()[1])
        logger.info("listening host=%s port=%s", self.settings.host, self.bound_port)
        return listener

    async def _load_model(self) -> None:
        import torch

        torch.set_num_threads(self.settings.model.num_threads)
        # NOTE: a stop during loading waits for the load (about 20 s) to finish,
        # because a thread cannot be interrupted.
        self.model = await self._in_worker(
            LocalModel.load,
            self.settings.model,
            device=self.settings.model.device,
            max_loaded_adapters=self.settings.max_loaded_adapters,
        )

    async def _in_worker(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._worker, functools.partial(call, *args, **kwargs)
        )

    # --- routes -------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        if self.model is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def list_models(self, request: Request) -> Response:
        names = [self.settings.served_model_name, *self.catalog.list_names()]
        return JSONResponse(
            {"object": "list", "data": [self._model_card(n) for n in names]}
        )

    async def retrieve_model(self, request: Request) -> Response:
        model_id = request.path_params["model_id"]
        if model_id != self.settings.served_model_name and not self.catalog.find(
            model_id
        ):
            raise ModelNotFoundError(model_id)
        return JSONResponse(self._model_card(model_id))

    def _model_card(self, name: str) -> dict[str, Any]:
        base = self.settings.served_model_name
        return {
            "id": name,
            "object": "model",
            "created": 0 if name == base else self.catalog.created_at(name),
            "owned_by": "flywheel",
            "root": name,
            "parent": None if name == base else base,
        }

    async def chat_completions(self, request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except ValueError as exc:
            raise InvalidRequestError(f"The body is not valid JSON: {exc}") from exc
        chat = parse_request(body)
        adapter = self._resolve_model(chat.model)
        model = self.model
        if model is None:
            raise ModelNotReadyError()
        params = self._params(chat)
        messages = chat_messages(chat)

        # Tokenizing and adapter loading touch the model: do them in its thread.
        prompt_ids = await self._in_worker(model.encode_chat, messages)
        model.check_fits(len(prompt_ids), params.max_new_tokens)
        if adapter is not None:
            await self._in_worker(model.ensure_adapter, adapter)

        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if chat.stream:
            events = self._stream(
                completion_id, chat, model, prompt_ids, params, adapter
            )
            return StreamingResponse(
                events,
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        started = time.monotonic()
        generation = await self._in_worker(
            model.generate, prompt_ids, params, adapter=adapter
        )
        _log_generation(completion_id, chat.model, generation, started)
        return JSONResponse(
            completion_body(
                completion_id=completion_id,
                created=int(time.time()),
                model=chat.model,
                text=generation.text,
                finish_reason=generation.finish_reason,
                usage=usage_body(
                    generation.prompt_tokens, generation.completion_tokens
                ),
            )
        )

    def _resolve_model(self, name: str) -> AdapterRef | None:
        """None for the base model, the adapter for an adapter name, else a 404."""
        if name == self.settings.served_model_name:
            return None
        adapter = self.catalog.find(name)
        if adapter is None:
            raise ModelNotFoundError(name)
        return adapter

    def _params(self, chat: ChatCompletionRequest) -> GenerationParams:
        defaults = self.settings.model
        max_tokens = chat.max_completion_tokens or chat.max_tokens
        max_tokens = max_tokens or defaults.default_max_tokens
        if max_tokens > defaults.max_tokens_limit:
            raise InvalidRequestError(
                f"max_tokens is {max_tokens}, above this server's limit of "
                f"{defaults.max_tokens_limit}",
                param="max_tokens",
            )
        temperature = chat.temperature
        return GenerationParams(
            max_new_tokens=max_tokens,
            temperature=defaults.default_temperature
            if temperature is None
            else temperature,
            top_p=1.0 if chat.top_p is None else chat.top_p,
            seed=chat.seed,
            stop=chat.stop_sequences(),
        )

    async def _stream(
        self,
        completion_id: str,
        chat: ChatCompletionRequest,
        model: LocalModel,
        prompt_ids: list[int],
        params: GenerationParams,
        adapter: AdapterRef | None,
    ) -> AsyncIterator[str]:
        """Server-sent events: a role chunk, text chunks, the finish, usage, [DONE]."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str | None] = asyncio.Queue()
        client_gone = threading.Event()
        shape = functools.partial(
            chunk_body,
            completion_id=completion_id,
            created=int(time.time()),
            model=chat.model,
            include_usage=chat.include_usage(),
        )
        started = time.monotonic()

        def on_text(piece: str) -> None:
            loop.call_soon_threadsafe(pieces.put_nowait, piece)

        job = loop.run_in_executor(
            self._worker,
            functools.partial(
                model.generate,
                prompt_ids,
                params,
                adapter=adapter,
                on_text=on_text,
                should_stop=client_gone.is_set,
            ),
        )
        # Completion is announced through the loop after every queued piece.
        job.add_done_callback(lambda _: pieces.put_nowait(None))
        try:
            yield _event(shape(delta={"role": "assistant", "content": ""}))
            while (piece := await pieces.get()) is not None:
                yield _event(shape(delta={"content": piece}))
            generation = job.result()
            _log_generation(completion_id, chat.model, generation, started)
            yield _event(shape(delta={}, finish_reason=generation.finish_reason))
            if chat.include_usage():
                usage = usage_body(
                    generation.prompt_tokens, generation.completion_tokens
                )
                yield _event(shape(delta=None, usage=usage))
        except InferenceError as exc:
            logger.error(
                "generation failed completion_id=%s", completion_id, exc_info=True
            )
            yield _event(exc.to_body())
        except Exception:
            logger.error(
                "generation failed completion_id=%s", completion_id, exc_info=True
            )
            yield _event(InferenceError("The generation failed").to_body())
        finally:
            # Also reached when the client disconnects: stop generating for nobody.
            client_gone.set()
        yield "data: [DONE]\n\n"


def _event(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _error_response(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, InferenceError)
    # A 503 while loading is expected; a 500 is a failure worth a traceback.
    if exc.status_code >= 500 and not exc.retriable:
        logger.error("request failed path=%s", request.url.path, exc_info=exc)
    return JSONResponse(exc.to_body(), status_code=exc.status_code)


def _log_generation(
    completion_id: str, model: str, generation: Any, started: float
) -> None:
    logger.info(
        "chat completion completion_id=%s model=%s prompt_tokens=%s "
        "completion_tokens=%s finish=%s seconds=%.2f",
        completion_id,
        model,
        generation.prompt_tokens,
        generation.completion_tokens,
        generation.finish_reason,
        time.monotonic() - started,
    )
