"""Upgrade (RFC 9110 §7.8) is tunnelled: after the upstream's 101 the proxy relays raw
bytes both ways; when the upstream declines, the answer is forwarded and the
connection closes (the client's bytes after the head were never HTTP)."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import Client
from tests.rawclient import eventually


class EchoUpgradeServer(asyncio.Protocol):
    """Answers an Upgrade request with 101, then echoes every byte upper-cased."""

    def __init__(self, accept: bool) -> None:
        self.accept = accept
        self.buf = b""
        self.tunnel = False
        self.transport = None
        self.head = b""

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        if self.tunnel:
            self.transport.write(data.upper())
            return
        self.buf += data
        if b"\r\n\r\n" in self.buf:
            self.head, _, rest = self.buf.partition(b"\r\n\r\n")
            if self.accept:
                self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n"
                                     b"Upgrade: echo\r\n\r\n" + rest.upper())
                self.tunnel = True
            else:
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nno")


@pytest.fixture
async def echo_upgrade():
    servers = []

    async def make(accept: bool = True):
        loop = asyncio.get_running_loop()
        protocols = []

        def factory():
            protocols.append(EchoUpgradeServer(accept))
            return protocols[-1]

        server = await loop.create_server(factory, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", protocols

    yield make
    for s in servers:
        s.close()


async def test_upgrade_is_tunnelled(gateway, echo_upgrade):
    url, protocols = await echo_upgrade(accept=True)
    gw = await gateway([url], timeouts={"response_header": 0.3})
    client = await Client.open(gw.port)
    try:
        await client.send_raw(b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\nhello")
        async with asyncio.timeout(5):
            head = await client.reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101")
        assert b"upgrade: echo" in head.lower()
        async with asyncio.timeout(5):
            assert await client.reader.readexactly(5) == b"HELLO"
        # longer than response_header: the tunnel must not be timed out as a slow head
        await asyncio.sleep(0.5)
        await client.send_raw(b"more bytes")
        async with asyncio.timeout(5):
            assert await client.reader.readexactly(10) == b"MORE BYTES"
    finally:
        client.close()
    assert b"upgrade: echo" in protocols[0].head.lower()
    assert b"connection: upgrade" in protocols[0].head.lower()


async def test_upgrade_latency_sample_is_the_time_to_the_101(gateway, echo_upgrade):
    """The attempt's latency sample runs from its start to the 101 head (it was negative:
    the head's time was only taken for final responses)."""
    url, _ = await echo_upgrade(accept=True)
    gw = await gateway([url])
    server = next(iter(gw.proxy.pools.values())).servers[0]
    client = await Client.open(gw.port)
    try:
        await client.send_raw(b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        async with asyncio.timeout(5):
            assert (await client.reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
    finally:
        client.close()
    # the sample is taken when the tunnel ends
    [sample] = await eventually(server.latency.samples, "the attempt's latency sample", 5.0)
    assert 0 <= sample < 5000


async def test_declined_upgrade_is_forwarded_then_closed(gateway, echo_upgrade):
    url, _ = await echo_upgrade(accept=False)
    gw = await gateway([url])
    client = await Client.open(gw.port)
    try:
        await client.send_raw(b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        data = await client.read_all()
    finally:
        client.close()
    assert data.startswith(b"HTTP/1.1 200")
    assert data.endswith(b"no")
    assert b"connection: close" in data.lower()


async def test_declined_upgrade_never_leaks_client_bytes_upstream(gateway, echo_upgrade):
    """Regression: bytes the client sent after an Upgrade head were forwarded as if they
    were a body, and the connection was pooled after a declined upgrade, so the upstream
    read them as the start of the next request (a smuggling vector)."""
    url, protocols = await echo_upgrade(accept=False)
    gw = await gateway([url])
    client = await Client.open(gw.port)
    try:
        await client.send_raw(b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n"
                              b"GET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n")
        data = await client.read_all()
    finally:
        client.close()
    assert data.startswith(b"HTTP/1.1 200")
    assert b"/smuggled" not in protocols[0].buf
    assert not any(len(p) for p in gw.proxy.pools["app"].idle.values())
