"""The poll loops' HTTP client (extproc/telemetry/http.py) against a raw local server that answers each
request with the next scripted answer, byte for byte."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from extproc.telemetry.http import MAX_BODY, HttpError, PageClient, Target


class Scripted:
    """A server on 127.0.0.1 answering each request with the next of ``answers`` (``None``: close the
    connection without answering; ``b""``: never answer), closing after an HTTP/1.0 or Connection: close
    answer."""

    def __init__(self, answers: list[bytes | None]) -> None:
        self.answers = answers
        self.requests: list[bytes] = []
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.port = 0
        self.writers: list[asyncio.StreamWriter] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests.append(head)
                answer = self.answers.pop(0)
                if answer is None:
                    break
                writer.write(answer)
                await writer.drain()
                if answer.startswith(b"HTTP/1.0") or b"Connection: close" in answer:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    def target(self, path: str = "/metrics") -> Target:
        return Target.parse(f"http://127.0.0.1:{self.port}{path}")


@pytest.fixture
async def client() -> AsyncIterator[PageClient]:
    pages = PageClient()
    try:
        yield pages
    finally:
        await pages.aclose()


def ok(body: bytes, *headers: str) -> bytes:
    head = "".join(f"{h}\r\n" for h in headers)
    return f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{head}\r\n".encode() + body


async def serve(answers: list[bytes | None]) -> Scripted:
    server = Scripted(answers)
    await server.start()
    return server


async def test_gets_reuse_one_connection(client: PageClient) -> None:
    server = await serve([ok(b"first"), ok(b"second"), b"HTTP/1.1 503 Unavailable\r\nContent-Length: 4\r\n\r\nbusy"])
    target = server.target("/clusters?format=json")
    assert await client.get(target) == b"first"
    assert await client.get(target) == b"second"
    with pytest.raises(HttpError, match=r"HTTP 503"):
        await client.get(target)
    assert server.connections == 1
    assert server.requests[0] == (
        f"GET /clusters?format=json HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nAccept: */*\r\n\r\n".encode()
    )


async def test_chunked_and_close_delimited_bodies(client: PageClient) -> None:
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n6\r\n world\r\n0\r\nT: 1\r\n\r\n"
    server = await serve([chunked, ok(b"again"), b"HTTP/1.0 200 OK\r\n\r\nto the end"])
    target = server.target()
    assert await client.get(target) == b"hello world"
    assert await client.get(target) == b"again"
    assert await client.get(target) == b"to the end"  # HTTP/1.0 without keep-alive: read until closed
    assert server.connections == 1
    assert await serve_once(client, ok(b"x", "Connection: close")) == 2  # closed after it: a new connection


async def serve_once(client: PageClient, answer: bytes) -> int:
    """GET ``answer`` twice from a fresh server; how many connections that took."""
    server = await serve([answer, answer])
    target = server.target()
    await client.get(target)
    await client.get(target)
    return server.connections


async def test_a_connection_the_server_closed_is_replaced_once(client: PageClient) -> None:
    server = await serve([ok(b"one"), None, ok(b"two"), None, None])
    target = server.target()
    assert await client.get(target) == b"one"
    # The server drops the kept connection without answering: sent again on a new one.
    assert await client.get(target) == b"two"
    assert server.connections == 2
    # A new connection that is closed unanswered is a failure, not retried for ever.
    with pytest.raises(asyncio.IncompleteReadError):
        await client.get(target)
    assert server.connections == 3


async def test_bad_answers_fail_and_close_their_connection(client: PageClient) -> None:
    too_long = f"HTTP/1.1 200 OK\r\nContent-Length: {MAX_BODY + 1}\r\n\r\n".encode()
    bad_length = b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"
    server = await serve([b"SSH-2.0-OpenSSH\r\n\r\n", too_long, bad_length, ok(b"fine")])
    target = server.target()
    for problem in ("not an HTTP/1.x answer", "out of range", "bad Content-Length"):
        with pytest.raises(HttpError, match=problem):
            await client.get(target)
    assert await client.get(target) == b"fine"
    assert server.connections == 4  # each failure closed its connection


async def test_a_get_cut_short_by_its_timeout_closes_its_connection(client: PageClient) -> None:
    server = await serve([b"", ok(b"late")])
    target = server.target()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await client.get(target)
    assert await client.get(target) == b"late"
    assert server.connections == 2
    await client.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await client.get(target)


def test_targets_parse_their_url() -> None:
    target = Target.parse("https://[::1]:8443/metrics", server_name="triton.test")
    assert (target.host, target.port, target.server_hostname) == ("::1", 8443, "triton.test")
    assert target.context is not None and target.request.startswith(b"GET /metrics HTTP/1.1\r\nHost: [::1]:8443\r\n")
    plain = Target.parse("http://10.0.0.7:8002/metrics", server_name="ignored")
    assert (plain.port, plain.context, plain.server_hostname) == (8002, None, None)
    with pytest.raises(ValueError, match="not an http"):
        Target.parse("unix:/run/envoy.sock")
