"""The upstream HTTP client against a real socket server that answers scripted bytes."""

from __future__ import annotations

import asyncio
import gzip
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from services.gateway.upstream_http import (
    BodyBrokenError,
    ConnectError,
    DisconnectedError,
    Endpoint,
    HttpClient,
    ReadTimeoutError,
    TooLargeError,
)
from tests.certificates import self_signed

HEAD = b"content-type: application/json\r\n"
OK_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"


class ScriptedServer:
    """Answers each request with `answer(n)` (n counts requests from 0).

    An answer is bytes to write, optionally followed by closing the connection; it
    records the raw requests and how many connections were opened.
    """

    def __init__(self, answer: Callable[[int], tuple[bytes, bool] | None]) -> None:
        self._answer = answer
        self.requests: list[bytes] = []
        self.connections = 0
        self.hold = asyncio.Event()
        self.hold.set()
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> Endpoint:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return Endpoint.of(f"http://127.0.0.1:{port}/v1/chat/completions")

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                body = await reader.readexactly(length)
                number = len(self.requests)
                self.requests.append(head + body)
                await self.hold.wait()
                scripted = self._answer(number)
                if scripted is None:
                    await asyncio.sleep(3600)  # never answers
                    return
                data, close = scripted
                writer.write(data)
                await writer.drain()
                if close:
                    writer.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


def json_answer(body: bytes, *, extra: bytes = b"") -> bytes:
    return OK_HEAD + extra + b"content-length: %d\r\n\r\n" % len(body) + body


@pytest.fixture
async def client() -> AsyncIterator[HttpClient]:
    http = HttpClient(connect_timeout_s=2.0, read_timeout_s=2.0, max_connections=8)
    yield http
    await http.close()


async def serving(
    answer: Callable[[int], tuple[bytes, bool] | None],
) -> tuple[ScriptedServer, Endpoint]:
    server = ScriptedServer(answer)
    return server, await server.start()


async def test_keep_alive_connection_is_reused_and_request_is_well_formed(
    client: HttpClient,
):
    server, endpoint = await serving(lambda n: (json_answer(b'{"n":%d}' % n), False))

    bodies = []
    for _ in range(3):
        response = await client.post(endpoint, HEAD, b'{"q":1}')
        bodies.append(await response.read(1 << 20))
    await server.stop()

    assert bodies == [b'{"n":0}', b'{"n":1}', b'{"n":2}']
    assert server.connections == 1
    request = server.requests[0]
    assert request.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert f"host: 127.0.0.1:{endpoint.port}\r\n".encode() in request
    assert b"content-length: 7\r\n" in request and request.endswith(b'{"q":1}')


async def test_chunked_gzip_body_is_decoded(client: HttpClient):
    packed = gzip.compress(b'{"hello":"world"}')
    chunked = b"".join(
        b"%x\r\n%b\r\n" % (len(part), part) for part in (packed[:10], packed[10:])
    )
    answer = (
        OK_HEAD
        + b"content-encoding: gzip\r\ntransfer-encoding: chunked\r\n\r\n"
        + chunked
        + b"0\r\n\r\n"
    )
    server, endpoint = await serving(lambda n: (answer, False))

    response = await client.post(endpoint, HEAD, b"{}")
    body = await response.read(1 << 20)
    await server.stop()

    assert response.status == 200 and body == b'{"hello":"world"}'


async def test_body_ended_by_the_connection_close_is_whole(client: HttpClient):
    answer = OK_HEAD + b"connection: close\r\n\r\n" + b'{"until":"eof"}'
    server, endpoint = await serving(lambda n: (answer, True))

    first = await (await client.post(endpoint, HEAD, b"{}")).read(1 << 20)
    second = await (await client.post(endpoint, HEAD, b"{}")).read(1 << 20)
    await server.stop()

    assert first == second == b'{"until":"eof"}'
    assert server.connections == 2


async def test_connection_the_upstream_closed_while_idle_is_not_reused(
    client: HttpClient,
):
    # No "connection: close" header: the client learns it from the socket alone.
    server, endpoint = await serving(lambda n: (json_answer(b"{}"), True))

    await (await client.post(endpoint, HEAD, b"{}")).read(1 << 20)
    await asyncio.sleep(0.1)
    await (await client.post(endpoint, HEAD, b"{}")).read(1 << 20)
    await server.stop()

    assert server.connections == 2


async def test_closed_before_the_answer_and_mid_body_fail_differently(
    client: HttpClient,
):
    cut = OK_HEAD + b"content-length: 100\r\n\r\n" + b'{"partial'
    server, endpoint = await serving(lambda n: (b"", True) if n == 0 else (cut, True))

    with pytest.raises(DisconnectedError):
        await client.post(endpoint, HEAD, b"{}")
    response = await client.post(endpoint, HEAD, b"{}")
    with pytest.raises(BodyBrokenError):
        await response.read(1 << 20)
    await server.stop()


async def test_silence_times_out_and_a_closed_port_does_not_connect():
    http = HttpClient(connect_timeout_s=2.0, read_timeout_s=0.2, max_connections=2)
    server, endpoint = await serving(lambda n: None)
    with pytest.raises(ReadTimeoutError):
        await http.post(endpoint, HEAD, b"{}")
    await server.stop()
    await asyncio.sleep(0.05)

    closed = ScriptedServer(lambda n: None)
    closed_endpoint = await closed.start()
    await closed.stop()
    with pytest.raises(ConnectError):
        await http.post(closed_endpoint, HEAD, b"{}")
    await http.close()


async def test_a_body_past_the_limit_fails_and_its_connection_is_dropped(
    client: HttpClient,
):
    server, endpoint = await serving(lambda n: (json_answer(b"x" * 5000), False))

    response = await client.post(endpoint, HEAD, b"{}")
    with pytest.raises(TooLargeError):
        await response.read(1024)
    response.close()
    small = await client.post(endpoint, HEAD, b"{}")
    assert len(await small.read(1 << 20)) == 5000
    await server.stop()

    assert server.connections == 2


async def test_calls_past_max_connections_wait_for_a_free_one():
    http = HttpClient(connect_timeout_s=2.0, read_timeout_s=5.0, max_connections=1)
    server, endpoint = await serving(lambda n: (json_answer(b"{}"), False))
    server.hold.clear()

    first = asyncio.create_task(http.post(endpoint, HEAD, b"{}"))
    second = asyncio.create_task(http.post(endpoint, HEAD, b"{}"))
    await asyncio.sleep(0.2)
    assert len(server.requests) == 1  # the second waits for the only connection
    server.hold.set()
    await (await first).read(1 << 20)
    await (await second).read(1 << 20)
    await server.stop()
    await http.close()

    assert server.connections == 1 and len(server.requests) == 2


async def test_a_streamed_body_larger_than_the_buffer_arrives_whole(
    client: HttpClient,
):
    pieces = [b"data: %d %s\n\n" % (n, b"y" * 4000) for n in range(100)]
    chunked = b"".join(b"%x\r\n%b\r\n" % (len(piece), piece) for piece in pieces)
    answer = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
        b"transfer-encoding: chunked\r\n\r\n" + chunked + b"0\r\n\r\n"
    )
    server, endpoint = await serving(lambda n: (answer, False))

    response = await client.post(endpoint, HEAD, b"{}")
    await asyncio.sleep(0.2)  # let it all arrive: reading pauses past 64 KiB
    received = b""
    async for data in response.iter_any():
        received += data
        await asyncio.sleep(0)
    assert response.at_eof()
    response.release()
    again = await client.post(endpoint, HEAD, b"{}")
    async for _ in again.iter_any():
        pass
    again.release()
    await server.stop()

    assert received == b"".join(pieces)
    assert server.connections == 1


def test_endpoint_head_names_the_host_as_http_wants_it():
    assert Endpoint.of("https://api.example.org/v1/chat/completions").head == (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: api.example.org\r\n"
    )
    v6 = Endpoint.of("http://[::1]:8001/v1/chat/completions?x=1")
    assert (v6.host, v6.port, v6.tls) == ("::1", 8001, False)
    assert v6.head.startswith(b"POST /v1/chat/completions?x=1 HTTP/1.1\r\n")
    assert b"host: [::1]:8001\r\n" in v6.head
    with pytest.raises(ValueError, match="not an http"):
        Endpoint.of("ftp://example.org/v1")


async def test_https_upstream_is_verified_and_served(tmp_path: Path):
    cert_file, key_file = self_signed(tmp_path)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert_file, key_file)
    answers = ScriptedServer(lambda n: (json_answer(b'{"tls":true}'), False))
    answers._server = await asyncio.start_server(
        answers._serve, "127.0.0.1", 0, ssl=server_tls
    )
    port = answers._server.sockets[0].getsockname()[1]
    endpoint = Endpoint.of(f"https://127.0.0.1:{port}/v1/chat/completions")

    trusting = ssl.create_default_context(cafile=str(cert_file))
    http = HttpClient(
        connect_timeout_s=2.0,
        read_timeout_s=2.0,
        max_connections=2,
        tls_context=trusting,
    )
    body = await (await http.post(endpoint, HEAD, b"{}")).read(1 << 20)
    await http.close()
    # Without the certificate's issuer among the trusted: refused.
    strict = HttpClient(connect_timeout_s=2.0, read_timeout_s=2.0, max_connections=2)
    with pytest.raises(ConnectError):
        await strict.post(endpoint, HEAD, b"{}")
    await answers.stop()

    assert body == b'{"tls":true}'
