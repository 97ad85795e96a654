"""Names, hints and detail="minimal", end to end on loopback.

DNS never leaves this machine: "localhost" comes from /etc/hosts, and failures come
from an injected lookup (Server(lookup=...)), never from a real resolver."""

from __future__ import annotations

import asyncio
import socket

import orjson
import pytest

from tests.conftest import http

pytestmark = pytest.mark.parametrize("parser", ["llhttp"])


async def test_a_name_from_etc_hosts_works(upstream, gateway):
    up = await upstream("ok")
    gw = await gateway([f"http://localhost:{up.port}"])
    reply = await http(gw.port)
    assert reply.status == 200
    server = gw.proxy.pools["app"].servers[0]
    assert any(e.endswith(f":{up.port}") for e in server.snapshot(0)["endpoints"])


async def test_several_addresses_are_endpoints_of_one_server(upstream, gateway):
    """A name with two addresses: both serve, both are listed, connections rotate."""
    up = await upstream("ok", host="127.0.0.1")
    alt = await upstream("ok", host="127.0.0.2", port=up.port)

    async def lookup(host, port):
        return ["127.0.0.1", "127.0.0.2"]

    gw = await gateway([f"http://svc.test:{up.port}"], lookup=lookup, pool={"retries": 0})
    for _ in range(4):  # /close answers close-delimited: never pooled, so each request dials
        r = await http(gw.port, "GET", "/close")
        assert r.status == 200 and r.body == b"bye\n"
    snap = gw.proxy.pools["app"].servers[0].snapshot(0)
    assert snap["endpoints"] == [f"127.0.0.1:{up.port}", f"127.0.0.2:{up.port}"]
    assert up.connections_accepted >= 1 and alt.connections_accepted >= 1


async def test_name_that_does_not_resolve_is_dns_error(gateway):
    async def lookup(host, port):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    gw = await gateway(["http://nowhere.test:9"], lookup=lookup, pool={"retries": 0})
    reply = await http(gw.port)
    assert reply.status == 502
    ps = reply.our_status()
    assert ps["error"] == "dns_error" and ps["rcode"] == "NXDOMAIN"
    assert "nowhere.test" in ps["details"]
    hint = orjson.loads(reply.body)["hint"]
    assert "nowhere.test" in hint


async def test_slow_resolver_is_dns_timeout(gateway):
    async def lookup(host, port):
        await asyncio.sleep(30)  # the resolver never answers; timeouts.connect bounds it
        return []

    gw = await gateway(["http://slow.test:9"], lookup=lookup, pool={"retries": 0},
                       timeouts={"connect": 0.2})
    reply = await http(gw.port)
    assert reply.status == 504
    assert reply.our_status()["error"] == "dns_timeout"
    assert 0.2 <= reply.elapsed < 3


async def test_hint_has_real_values_in_body_and_debug_never_in_header(upstream, gateway):
    up = await upstream("refuse")
    gw = await gateway([up], pool={"retries": 0})
    reply = await http(gw.port)
    body = orjson.loads(reply.body)
    assert f"Nothing is listening on {up.address}" in body["hint"]
    assert "hint" not in ", ".join(reply.all("proxy-status")).lower()
    assert "Nothing is listening" not in ", ".join(reply.all("proxy-status"))
    entry = gw.proxy.recorder.get(reply.header("x-request-id"))
    assert entry["hint"] == body["hint"]
    text = await http(gw.port, headers=[("Accept", "text/plain")])
    assert f"Nothing is listening on {up.address}" in text.body.decode()
    page = await http(gw.port, headers=[("Accept", "text/html")])
    assert b"Nothing is listening on" in page.body


@pytest.mark.parametrize("accept", ["application/json", "text/plain", "text/html"])
async def test_minimal_detail_leaks_nothing(upstream, gateway, accept):
    """detail = "minimal": only the error token and request id, everywhere a client looks."""
    up = await upstream("refuse")
    gw = await gateway([up], pool={"retries": 1}, diagnostics={"detail": "minimal"})
    reply = await http(gw.port, headers=[("Accept", accept)])
    assert reply.status == 502
    members = reply.proxy_status
    assert len(members) == 1 and set(members[0][1]) == {"error"}
    everything = (", ".join(f"{n}: {v}" for n, v in reply.headers)).encode() + reply.body
    for secret in (up.address.encode(), str(up.port).encode(), b"ECONNREFUSED", b"Nothing is listening",
                   b"attempts", b"next-hop", b"hint", b"details"):
        assert secret not in everything, (secret, everything)
    assert reply.header("x-request-id").encode() in reply.body


async def test_one_dead_address_does_not_take_the_server_out(upstream, gateway):
    """Regression: with a name resolving to a dead and a live address (localhost = ::1 +
    127.0.0.1 with the service on one only), every other new connection was refused and
    passive ejection took the whole server out."""
    live = await upstream("ok", host="127.0.0.1")
    dead = await upstream("refuse", host="127.0.0.2", port=live.port)

    async def lookup(host, port):
        return ["127.0.0.2", "127.0.0.1"]

    gw = await gateway([f"http://svc.test:{live.port}"], lookup=lookup, pool={"retries": 0})
    for _ in range(8):
        assert (await http(gw.port, "GET", "/close")).status == 200
    server = gw.proxy.pools["app"].servers[0]
    assert server.failures_total == 0 and str(server.state) != "ejected"
    del dead


async def test_cold_lookups_are_shared_and_failures_remembered(upstream, gateway):
    """Regression: 50 concurrent requests on a cold cache made 50 lookups, and a failing
    name was looked up again for every request."""
    up = await upstream("ok")
    calls = {"ok": 0, "bad": 0}

    async def lookup(host, port):
        calls["ok" if host == "svc.test" else "bad"] += 1
        await asyncio.sleep(0.05)  # a resolver round trip, so the requests overlap
        if host != "svc.test":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return ["127.0.0.1"]

    gw = await gateway([f"http://svc.test:{up.port}"], lookup=lookup)
    replies = await asyncio.gather(*(http(gw.port) for _ in range(20)))
    assert all(r.status == 200 for r in replies) and calls["ok"] == 1
    bad = await gateway(["http://bad.test:9"], lookup=lookup, pool={"retries": 0})
    replies = await asyncio.gather(*(http(bad.port) for _ in range(10)))
    assert all(r.our_status()["error"] == "dns_error" for r in replies) and calls["bad"] == 1
    assert bad.proxy.pools["app"].servers[0].failures_total == 0  # DNS never ejects a server


async def test_a_lookup_crash_is_dns_error_not_internal(gateway):
    """Regression: a non-gaierror from the lookup (IDNA rejects a 64-byte label) escaped
    as 500 proxy_internal_error."""
    async def lookup(host, port):
        raise UnicodeError("label too long")

    gw = await gateway(["http://x.test:9"], lookup=lookup, pool={"retries": 0})
    reply = await http(gw.port)
    assert reply.status == 502 and reply.our_status()["error"] == "dns_error"
