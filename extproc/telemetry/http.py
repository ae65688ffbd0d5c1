"""The GETs of the poll loops (Triton's metrics page, Envoy's ``/clusters``): HTTP/1.1 over connections kept
open between polls, one request at a time on each.

A poll is one small GET to a server the fleet file names, about once a second per host; what it costs
the picker is mostly the client's own code per request, of which a general client (aiohttp: URL objects,
headers, tracing hooks, timers per request) has several times what these few lines on asyncio streams
need (docs/performance.md, "What each step bought"). They read what Triton's metrics server and Envoy's
admin answer (a body with ``Content-Length``, chunked, or up to the end of the connection) and nothing
else: no redirects, no compression (none is asked for), no proxies, no cookies.

A connection is reused while the server keeps it open; one that the server closed while it was idle fails
its next request before any answer, which is then sent once more on a new connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

# The largest body read (Envoy's /clusters of a fleet of thousands of hosts is a few MB).
MAX_BODY: Final = 64 * 1024 * 1024
# The longest status line, header block or chunk size line; the stream buffers up to twice this before it
# stops reading the socket, which a large body then costs a pause and a resume per step.
_BUFFER: Final = 1024 * 1024


class HttpError(Exception):
    """An answer that is not usable: an HTTP status other than 200, or not HTTP/1.x, or malformed."""


@dataclass(frozen=True, slots=True, eq=False)  # compared and hashed by identity: a client's dict key
class Target:
    """Where one poll's GET goes, parsed once from its URL."""

    url: str
    host: str  # to connect to
    port: int
    request: bytes  # the request, as sent
    context: ssl.SSLContext | None = None  # https: the context that checks the server
    server_hostname: str | None = None  # https: the name the certificate must carry (None: the host's)

    @classmethod
    def parse(cls, url: str, context: ssl.SSLContext | None = None, server_name: str | None = None) -> Target:
        """``url``: ``http://`` or ``https://`` (with ``context``: a default one if None), host, port and
        path; ``server_name``: where the certificate names another name than the URL's host."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or parts.hostname is None:
            raise ValueError(f"not an http(s) URL with a host: {url!r}")
        tls = parts.scheme == "https"
        port = parts.port if parts.port is not None else (443 if tls else 80)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        authority = parts.netloc.rpartition("@")[2]
        request = f"GET {path} HTTP/1.1\r\nHost: {authority}\r\nAccept: */*\r\n\r\n".encode("ascii")
        if tls and context is None:
            context = ssl.create_default_context()
        return cls(url, parts.hostname, port, request, context if tls else None, server_name if tls else None)


_Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class _Closed(Exception):
    """The server closed a reused connection before it answered."""


class PageClient:
    """GETs bodies; keeps an idle connection per target between them. Each :meth:`get` has its own
    deadline, applied by the caller (``asyncio.timeout``); a GET cut short closes its connection."""

    def __init__(self) -> None:
        self._idle: dict[Target, list[_Connection]] = {}
        self._closed = False

    async def get(self, target: Target) -> bytes:
        """The body of a 200 answer to a GET of ``target``; raises :class:`HttpError` for another status,
        ``OSError`` (``ssl.SSLError`` included) or ``asyncio.IncompleteReadError`` where the exchange failed."""
        if self._closed:
            raise RuntimeError("PageClient is closed")
        idle = self._idle.setdefault(target, [])
        if idle:
            try:
                return await self._exchange(target, idle.pop(), reused=True)
            except _Closed:
                pass
        return await self._exchange(target, await self._connect(target), reused=False)

    async def aclose(self) -> None:
        """Close the idle connections; later GETs are refused."""
        self._closed = True
        connections = [c for idle in self._idle.values() for c in idle]
        self._idle.clear()
        for _, writer in connections:
            writer.close()
        for _, writer in connections:
            with contextlib.suppress(OSError):  # ssl.SSLError is one
                await writer.wait_closed()

    @staticmethod
    async def _connect(target: Target) -> _Connection:
        return await asyncio.open_connection(
            target.host,
            target.port,
            ssl=target.context,
            server_hostname=target.server_hostname if target.context is not None else None,
            limit=_BUFFER,
        )

    async def _exchange(self, target: Target, connection: _Connection, *, reused: bool) -> bytes:
        reader, writer = connection
        keep = False
        try:
            writer.write(target.request)
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as exc:
                if reused and not exc.partial:
                    raise _Closed from None
                raise
            except ConnectionError:
                if reused:
                    raise _Closed from None
                raise
            status, headers = _parse_head(head, target.url)
            body, keep = await _read_body(reader, headers)
            if status != 200:
                raise HttpError(f"GET {target.url}: HTTP {status}")
            return body
        finally:
            if keep and not self._closed:
                self._idle[target].append(connection)
            else:
                writer.close()


def _parse_head(head: bytes, url: str) -> tuple[int, dict[bytes, bytes]]:
    lines = head[:-4].split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise HttpError(f"GET {url}: not an HTTP/1.x answer: {lines[0][:80]!r}")
    try:
        status = int(rest[:3])
    except ValueError:
        raise HttpError(f"GET {url}: bad status line {lines[0][:80]!r}") from None
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if version == b"HTTP/1.0" and headers.get(b"connection", b"").lower() != b"keep-alive":
        headers[b"connection"] = b"close"
    return status, headers


async def _read_body(reader: asyncio.StreamReader, headers: dict[bytes, bytes]) -> tuple[bytes, bool]:
    """The body, and whether the connection may carry another request."""
    keep = headers.get(b"connection", b"").lower() != b"close"
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        chunks: list[bytes] = []
        size = 0
        while True:
            line = await reader.readuntil(b"\r\n")
            try:
                length = int(line.partition(b";")[0], 16)
            except ValueError:
                raise HttpError(f"bad chunk size line {line[:40]!r}") from None
            if length == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                    pass
                return b"".join(chunks), keep
            size += length
            if size > MAX_BODY:
                raise HttpError(f"body over {MAX_BODY} bytes")
            chunks.append(await reader.readexactly(length))
            await reader.readexactly(2)
    length_header = headers.get(b"content-length")
    if length_header is None:  # the body ends with the connection
        body = await reader.read(MAX_BODY + 1)
        while len(body) <= MAX_BODY and (more := await reader.read(MAX_BODY + 1 - len(body))):
            body += more
        if len(body) > MAX_BODY:
            raise HttpError(f"body over {MAX_BODY} bytes")
        return body, False
    try:
        length = int(length_header)
    except ValueError:
        raise HttpError(f"bad Content-Length {length_header[:40]!r}") from None
    if not 0 <= length <= MAX_BODY:
        raise HttpError(f"Content-Length {length} out of range")
    return await reader.readexactly(length), keep
