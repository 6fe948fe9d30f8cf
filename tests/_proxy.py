"""A small forward proxy on 127.0.0.1:0 for tests: CONNECT tunnels, and a record of each request.

It answers what a corporate egress proxy answers to an HTTPS client: ``CONNECT host:port``
opens a tunnel (the TLS inside is the client's and the server's business). A plain
absolute-form request (``POST http://host/...``) is recorded and refused with 502: the client
never sends one, since plain http:// is for loopback only and loopback is never proxied.

Host names can be mapped to loopback, so a test can aim a client at
``https://ingest.test:PORT``, a host only the proxy can reach, just as a client behind a
proxy cannot resolve the internet itself. With ``credentials`` set it demands
``Proxy-Authorization: Basic ...`` and answers 407 without it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import Mapping
from types import TracebackType

import attrs

_HEAD_LIMIT = 64 * 1024


@attrs.frozen
class ProxyRecord:
    """One request the proxy received: its method, target and decoded credentials."""

    method: str
    target: str
    credentials: str | None


@attrs.define
class ForwardProxy:
    """Run with ``async with ForwardProxy(...) as proxy``; aim clients at ``proxy.url``."""

    hosts: Mapping[str, str] = attrs.field(factory=dict)
    credentials: str | None = None
    records: list[ProxyRecord] = attrs.field(init=False, factory=list)
    _server: asyncio.Server | None = attrs.field(init=False, default=None)
    _tasks: set[asyncio.Task[None]] = attrs.field(init=False, factory=set)

    @property
    def port(self) -> int:
        assert self._server is not None, "start the proxy first"
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> ForwardProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            # A client gone mid-request, or the proxy stopping (cancelled): end it quietly.
            with contextlib.suppress(
                ConnectionError,
                asyncio.IncompleteReadError,
                asyncio.LimitOverrunError,
                asyncio.CancelledError,
            ):
                await self._handle(reader, writer)
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if len(head) > _HEAD_LIMIT:
            return
        lines = head.decode("latin-1").split("\r\n")
        method, target, _version = lines[0].split(" ", 2)
        headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in lines[1:] if line)
        }
        credentials = None
        auth = headers.get("proxy-authorization", "")
        if auth.lower().startswith("basic "):
            credentials = base64.b64decode(auth[6:]).decode()
        self.records.append(ProxyRecord(method, target, credentials))
        if self.credentials is not None and credentials != self.credentials:
            writer.write(
                b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                b'Proxy-Authenticate: Basic realm="test"\r\nContent-Length: 0\r\n\r\n'
            )
            await writer.drain()
            return
        if method == "CONNECT":
            host, _, port = target.rpartition(":")
            upstream = await asyncio.open_connection(self.hosts.get(host, host), int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
            await _pipe_both(reader, writer, upstream)
            return
        writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()


async def _pipe_both(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
) -> None:
    up_reader, up_writer = upstream
    try:
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
    finally:
        up_writer.close()


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while chunk := await source.read(65536):
            sink.write(chunk)
            await sink.drain()
    except ConnectionError:
        pass
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            sink.write_eof()
