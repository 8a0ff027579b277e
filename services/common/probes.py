"""/metrics, /livez and /readyz on one port, served from a thread.

The HTTP server runs in its own thread (as prometheus_client's own server does), so
a scrape or a probe never waits for the event loop to be free. The checks never
block the loop either:

- liveness checks are plain functions called in the server thread; they read state
  the loop keeps up to date (a `Heartbeat`), and the server adds one of its own: the
  event loop must run a callback within `loop_timeout_s`;
- readiness checks are coroutine functions run *on* the loop (they may await a
  `SELECT 1` or a broker round trip), each within `check_timeout_s`; their combined
  result is cached for `cache_s`, so frequent probes cost one round of checks.

Both endpoints answer `{"status": "ok" | "unavailable", "problems": [...]}` with 200
or 503. Every other path serves the Prometheus exposition, as before.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import socketserver
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, make_wsgi_app
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

LiveCheck = Callable[[], list[str]]
ReadyCheck = Callable[[], Awaitable[list[str]]]
StartResponse = Callable[..., Any]


class Heartbeat:
    """When a loop last went round; silent longer than `max_silence_s` is not alive.

    `beat` is called on the event loop; `problems` is read from the server thread
    (a float assignment is atomic under the GIL).
    """

    def __init__(self, what: str, max_silence_s: float) -> None:
        self.what = what
        self.max_silence_s = max_silence_s
        self._last_s = time.monotonic()

    def beat(self) -> None:
        self._last_s = time.monotonic()

    def problems(self) -> list[str]:
        silent_s = time.monotonic() - self._last_s
        if silent_s <= self.max_silence_s:
            return []
        return [f"{self.what} silent for {silent_s:.0f} s (> {self.max_silence_s:g} s)"]


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _ThreadingServerV6(_ThreadingServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base name
        """Probes every few seconds would drown the log."""


class ProbeServer:
    """Serves /metrics, /livez and /readyz; `start` on the event loop."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        registry: Collector = REGISTRY,
        live_checks: Mapping[str, LiveCheck] | None = None,
        ready_checks: Mapping[str, ReadyCheck] | None = None,
        cache_s: float = 2.0,
        check_timeout_s: float = 3.0,
        loop_timeout_s: float = 5.0,
    ) -> None:
        self._host = host
        self._requested_port = port
        self._metrics_app = make_wsgi_app(registry)
        self._live_checks = dict(live_checks or {})
        self._ready_checks = dict(ready_checks or {})
        self._cache_s = cache_s
        self._check_timeout_s = check_timeout_s
        self._loop_timeout_s = loop_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._ready_lock = threading.Lock()
        self._ready_cache: tuple[float, list[str]] | None = None

    @property
    def port(self) -> int:
        """The port listened on (the requested one, or the one bound for 0)."""
        if self._server is None:
            return self._requested_port
        return int(self._server.server_port)

    def start(self) -> None:
        """Listen and serve from a daemon thread; call from the event loop."""
        self._loop = asyncio.get_running_loop()
        server_class = _ThreadingServerV6 if ":" in self._host else _ThreadingServer
        try:
            self._server = make_server(
                self._host,
                self._requested_port,
                self._application,
                server_class=server_class,
                handler_class=_QuietHandler,
            )
        except OSError as error:
            raise OSError(
                f"cannot serve /metrics, /livez and /readyz on {self._host}:"
                f"{self._requested_port} ({error.strerror}); change the service's "
                "metrics_port setting"
            ) from error
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="probe-server", daemon=True
        )
        self._thread.start()
        logger.info("metrics and probes served host=%s port=%d", self._host, self.port)

    def stop(self) -> None:
        """Stop serving and wait for the thread; idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # -- the checks (server thread) ----------------------------------------------

    def liveness(self) -> list[str]:
        """Problems that mean the process is stuck; empty when alive."""
        problems = self._loop_problems()
        for name, check in self._live_checks.items():
            try:
                problems.extend(f"{name}: {problem}" for problem in check())
            except Exception as error:
                problems.append(f"{name}: check failed: {error!r}")
        return problems

    def readiness(self) -> list[str]:
        """Problems that keep the service from its work; cached for `cache_s`."""
        with self._ready_lock:
            cached = self._ready_cache
            if cached is not None and time.monotonic() - cached[0] < self._cache_s:
                return list(cached[1])
            problems = self._run_ready_checks()
            self._ready_cache = (time.monotonic(), problems)
            return list(problems)

    def _loop_problems(self) -> list[str]:
        answered = threading.Event()
        try:
            self._running_loop().call_soon_threadsafe(answered.set)
        except RuntimeError as error:
            return [f"event loop: {error}"]
        if not answered.wait(self._loop_timeout_s):
            return [f"event loop: no answer within {self._loop_timeout_s:g} s"]
        return []

    def _run_ready_checks(self) -> list[str]:
        try:
            future = asyncio.run_coroutine_threadsafe(
                self._ready_round(), self._running_loop()
            )
        except RuntimeError as error:
            return [f"event loop: {error}"]
        try:
            # The round bounds each check; the margin covers the loop's own delay.
            return future.result(self._check_timeout_s + self._loop_timeout_s)
        except TimeoutError:
            future.cancel()
            return [f"event loop: checks not run within {self._loop_timeout_s:g} s"]

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None or self._loop.is_closed():
            raise RuntimeError("not running")
        return self._loop

    # -- the checks (event loop) -------------------------------------------------

    async def _ready_round(self) -> list[str]:
        checks = self._ready_checks.items()
        results = await asyncio.gather(
            *(self._one_check(name, check) for name, check in checks)
        )
        return [problem for problems in results for problem in problems]

    async def _one_check(self, name: str, check: ReadyCheck) -> list[str]:
        try:
            async with asyncio.timeout(self._check_timeout_s):
                problems = await check()
        except TimeoutError:
            return [f"{name}: no answer within {self._check_timeout_s:g} s"]
        except Exception as error:
            return [f"{name}: check failed: {error!r}"]
        return [f"{name}: {problem}" for problem in problems]

    # -- HTTP --------------------------------------------------------------------

    def _application(
        self, environ: dict[str, Any], start_response: StartResponse
    ) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/livez":
            return _answer(start_response, self.liveness())
        if path == "/readyz":
            return _answer(start_response, self.readiness())
        body: Iterable[bytes] = self._metrics_app(environ, start_response)
        return body


def _answer(start_response: StartResponse, problems: list[str]) -> list[bytes]:
    body = json.dumps(
        {"status": "unavailable" if problems else "ok", "problems": problems}
    ).encode()
    status = "503 Service Unavailable" if problems else "200 OK"
    start_response(
        status,
        [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
    )
    return [body]
