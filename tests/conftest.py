"""Shared fixtures: real loopback sockets only.

- `parser`: every integration test that uses it runs once per codec (llhttp, h11).
- `upstream(mode, **opts)`: a started diagnostics.faults.FaultServer, closed at teardown.
- `gateway(servers, **config)`: a started proxy on 127.0.0.1:0 in this event loop.
- `http(port, ...)`: a strict client (h11 parses the answer) returning a Reply.
- The hot path runs as built: compiled (setup.py), or plain Python with GATEWISE_PURE=1;
  the header says which, and a build older than its sources is refused.
- Event loop: uvloop by default (what `gatewise run` uses); tests marked `both_loops`
  also run on plain asyncio.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import h11
import pytest
import uvloop

from diagnostics.faults import FaultServer
from proxy import compiled
from proxy.config import parse_config
from proxy.server import Server
from tests.sfparse import Token, parse_list


def pytest_configure(config):
    """Python loads a built extension before its .py: tests of edited sources would run the
    old compiled code (proxy/compiled.py)."""
    stale = compiled.stale()
    if stale:
        raise pytest.UsageError(f"changed since the compiled build: {', '.join(stale)}. Rebuild "
                                f"(`make test` does; or .venv/bin/pip install -e .), or run with GATEWISE_PURE=1")


def pytest_collection_modifyitems(config, items):
    if compiled.is_compiled():
        skip = pytest.mark.skip(reason="patches what compiled code calls directly: "
                                       "runs in the plain-Python pass (GATEWISE_PURE=1)")
        for item in items:
            if item.get_closest_marker("pure_python"):
                item.add_marker(skip)


def pytest_report_header(config):
    return f"gatewise hot path: {compiled.describe()}"


def pytest_asyncio_loop_factories(config, item):
    """uvloop (what `gatewise run` uses) for every test; plain asyncio as well for tests
    marked `both_loops`, so nothing depends on one loop's quirks."""
    if item.get_closest_marker("both_loops"):
        return {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture(params=["llhttp", "h11"])
def parser(request) -> str:
    return request.param


@pytest.fixture
async def upstream():
    started: list[FaultServer] = []

    async def make(mode: str = "ok", **opts) -> FaultServer:
        server = await FaultServer(mode, **opts).start()
        started.append(server)
        return server

    yield make
    for server in started:
        await server.close()


def proxy_config(servers, *, parser: str = "llhttp", pool: dict | None = None, **sections):
    """A config dict for parse_config: one pool "app" of `servers` (FaultServer, URL or
    {"url":..., "weight":...}), catch-all route, listen on port 0."""
    entries = []
    for s in servers:
        if isinstance(s, FaultServer):
            entries.append({"url": s.url})
        elif isinstance(s, str):
            entries.append({"url": s})
        else:
            entries.append(dict(s))
    data = {"listen": {"address": "127.0.0.1:0", "parser": parser},
            "admin": {"address": "127.0.0.1:0"},
            "pools": {"app": {"servers": entries, **(pool or {})}}}
    for name, table in sections.items():
        data.setdefault(name, {}).update(table)
    return data


@pytest.fixture
async def gateway(parser):
    """Make in-process gateways; on teardown, fail the test if the loop's exception handler
    saw a gatewise bug (an exception that is not an OS-level connection error): uvloop
    reports an exception raised in a protocol callback there, and only logs it."""
    started: list[Server] = []
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    bugs: list[dict] = []

    def handler(the_loop, context: dict) -> None:
        if not isinstance(context.get("exception"), OSError):
            bugs.append(context)
        the_loop.default_exception_handler(context)

    loop.set_exception_handler(handler)

    async def make(servers, *, pool: dict | None = None, raw: dict | None = None, lookup=None,
                   **sections) -> Server:
        data = raw if raw is not None else proxy_config(servers, parser=parser, pool=pool, **sections)
        if raw is not None:
            data.setdefault("listen", {}).update({"address": "127.0.0.1:0", "parser": parser})
            data.setdefault("admin", {}).setdefault("address", "127.0.0.1:0")
        server = await Server(parse_config(data), lookup=lookup).start()
        started.append(server)
        return server

    yield make
    for server in started:
        await server.stop(grace=1.0)
    loop.set_exception_handler(previous)
    assert not bugs, f"the event loop reported: {[(c.get('message'), c.get('exception')) for c in bugs]}"


@dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    trailers: list[tuple[str, str]] = field(default_factory=list)
    elapsed: float = 0.0

    def header(self, name: str) -> str | None:
        name = name.lower()
        for n, v in self.headers:
            if n == name:
                return v
        return None

    def all(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n == name.lower()]

    @property
    def proxy_status(self) -> list:
        """Proxy-Status parsed strictly (RFC 8941 list); [] when absent."""
        value = ", ".join(self.all("proxy-status"))
        return parse_list(value) if value else []

    def our_status(self, name: str = "gatewise") -> dict:
        """Our Proxy-Status member's params (error as str), or {} when absent."""
        for item, params in self.proxy_status:
            if isinstance(item, Token) and item == name or item == name:
                return {k: str(v) if isinstance(v, Token) else v for k, v in params.items()}
        return {}


class ReplyReader:
    """One response parsed with h11 (the strict reference) from bytes the caller feeds:
    `poll()` returns the Reply, or None when it needs more (`conn.receive_data`, b"" = EOF).
    Pass the previous reader's `conn` to read the next pipelined response."""

    def __init__(self, method: str = "GET", conn: h11.Connection | None = None) -> None:
        if conn is None:
            conn = h11.Connection(h11.CLIENT)
        else:
            conn.start_next_cycle()
        # tell h11 what was asked, so it frames the answer (HEAD, 1xx)
        conn.send(h11.Request(method=method, target="/", headers=[("Host", "t")]))
        conn.send(h11.EndOfMessage())
        self.conn = conn
        self.informational: list[int] = []
        self._status, self._headers, self._body = 0, [], bytearray()
        self._start = time.monotonic()

    def poll(self) -> Reply | None:
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                return None
            if isinstance(event, h11.InformationalResponse):
                self.informational.append(event.status_code)
            elif isinstance(event, h11.Response):
                self._status = event.status_code
                self._headers = [(n.decode(), v.decode("latin-1")) for n, v in event.headers]
            elif isinstance(event, h11.Data):
                self._body += event.data
            elif isinstance(event, h11.EndOfMessage):
                trailers = [(n.decode(), v.decode("latin-1")) for n, v in event.headers]
                return Reply(self._status, self._headers, bytes(self._body), trailers,
                             time.monotonic() - self._start)
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("closed before a complete response")


async def read_reply(reader: asyncio.StreamReader, method: str = "GET", timeout: float = 10.0) -> Reply:
    """Read one response with h11 as the strict reference parser."""
    rr = ReplyReader(method)
    async with asyncio.timeout(timeout):
        while (reply := rr.poll()) is None:
            rr.conn.receive_data(await reader.read(65536))
    return reply


def build_request(method: str = "GET", path: str = "/", headers: list[tuple[str, str]] | None = None,
                  body: bytes | None = None, host: str = "test") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    hdrs = list(headers or [])
    if body is not None and not any(n.lower() in ("content-length", "transfer-encoding") for n, _ in hdrs):
        hdrs.append(("Content-Length", str(len(body))))
    lines += [f"{n}: {v}" for n, v in hdrs]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


async def http(port: int, method: str = "GET", path: str = "/", *, headers=None, body: bytes | None = None,
               host: str = "test", timeout: float = 10.0) -> Reply:
    """One request on a fresh connection (Connection: close)."""
    hdrs = list(headers or []) + [("Connection", "close")]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(build_request(method, path, hdrs, body, host))
        await writer.drain()
        return await read_reply(reader, method, timeout)
    finally:
        writer.close()


class Client:
    """A keep-alive client connection for several requests in a row."""

    def __init__(self, reader, writer) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> "Client":
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def request(self, method: str = "GET", path: str = "/", *, headers=None, body=None,
                      timeout: float = 10.0) -> Reply:
        self.writer.write(build_request(method, path, headers, body))
        await self.writer.drain()
        return await read_reply(self.reader, method, timeout)

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_all(self, timeout: float = 5.0) -> bytes:
        async with asyncio.timeout(timeout):
            return await self.reader.read()

    def close(self) -> None:
        self.writer.close()


async def raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, return everything the proxy sends until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(timeout):
            return await reader.read()
    finally:
        writer.close()
