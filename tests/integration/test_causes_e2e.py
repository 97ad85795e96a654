"""One row per failure cause: a real fault upstream, the real proxy on port 0, both codecs
and both event loops. Each row asserts the status, the Proxy-Status error token and
next-hop (parsed with a strict RFC 8941 parser), the body's attempts, and a timing bound
where a timeout is the feature."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from tests.conftest import Client, http, raw_exchange
from tests.rawclient import eventually

T_CONNECT = 0.3
T_HEAD = 0.4
T_IDLE_READ = 0.4

TIMEOUTS = {"connect": T_CONNECT, "response_header": T_HEAD, "idle_read": T_IDLE_READ}


pytestmark = pytest.mark.both_loops


# (fault mode, status, RFC 9209 token, min seconds, max seconds)
ROWS = [
    ("refuse", 502, "connection_refused", 0, 2),
    ("blackhole", 504, "connection_timeout", T_CONNECT, T_CONNECT + 2),
    ("reset", 502, "connection_terminated", 0, 2),
    ("close", 502, "connection_terminated", 0, 2),
    ("hang", 504, "http_response_timeout", T_HEAD, T_HEAD + 2),
    ("garbage", 502, "http_protocol_error", 0, 2),
    ("tls", 502, "http_protocol_error", 0, 2),
    ("huge-header", 502, "http_response_header_section_size", 0, 2),
]


@pytest.mark.parametrize("mode,status,token,lo,hi", ROWS, ids=[r[0] for r in ROWS])
async def test_failure_is_named(upstream, gateway, mode, status, token, lo, hi):
    up = await upstream(mode)
    gw = await gateway([up], pool={"retries": 0}, timeouts=TIMEOUTS)
    reply = await http(gw.port, "GET", "/")
    assert reply.status == status
    ps = reply.our_status()
    assert ps["error"] == token
    assert ps["next-hop"] == up.address
    assert reply.header("x-request-id")
    assert reply.header("date")  # RFC 9110 §6.6.1: gatewise has a clock
    body = orjson.loads(reply.body)
    assert body["status"] == status and body["error"] == token
    assert body["request_id"] == reply.header("x-request-id")
    assert [a["server"] for a in body["attempts"]] == [up.address]
    assert body["attempts"][0]["error"] == token
    assert lo <= reply.elapsed <= hi, reply.elapsed
    if mode == "tls":
        assert "TLS" in ps["details"] and "https://" in ps["details"]
    # the evidence is kept under the request id
    entry = gw.proxy.recorder.get(reply.header("x-request-id"))
    assert entry is not None and entry["error"] == token


async def test_every_attempt_is_listed(upstream, gateway):
    """Two refusing servers, retries=1: both are tried once, in the body and the details."""
    a, b = await upstream("refuse"), await upstream("refuse")
    gw = await gateway([a, b], pool={"retries": 1})
    reply = await http(gw.port)
    assert reply.status == 502
    attempts = orjson.loads(reply.body)["attempts"]
    assert sorted(x["server"] for x in attempts) == sorted([a.address, b.address])
    assert "2 attempts" in reply.our_status()["details"]


async def test_no_route_is_404(upstream, gateway):
    up = await upstream("ok")
    raw = {"pools": {"app": {"servers": [{"url": up.url}]}},
           "routes": [{"host": "api.example.com", "pool": "app"}]}
    gw = await gateway(None, raw=raw)
    reply = await http(gw.port, host="other.example.com")
    assert reply.status == 404
    assert reply.our_status()["error"] == "destination_not_found"
    assert up.requests_seen == 0
    ok = await http(gw.port, host="api.example.com")
    assert ok.status == 200


async def test_loop_is_detected(upstream, gateway):
    up = await upstream("ok")
    gw = await gateway([up])
    reply = await http(gw.port, headers=[("Via", "1.1 edge, 1.1 gatewise")])
    assert reply.status == 502
    assert reply.our_status()["error"] == "proxy_loop_detected"
    assert up.requests_seen == 0


async def test_real_loop_through_itself(gateway, upstream):
    """The proxy pointed at itself: the second hop sees its own Via and stops the loop."""
    placeholder = await upstream("refuse")
    gw = await gateway([placeholder], pool={"retries": 0})
    # re-point the only server at the proxy's own port
    server = gw.proxy.pools["app"].servers[0]
    server.port = gw.port
    reply = await http(gw.port)
    assert reply.status == 502
    assert reply.our_status()["error"] == "proxy_loop_detected"


async def test_upstream_5xx_gets_received_status(upstream, gateway):
    up = await upstream("status:503")
    gw = await gateway([up])
    reply = await http(gw.port)
    assert reply.status == 503  # forwarded, not replaced
    ps = reply.our_status()
    assert ps["received-status"] == 503
    assert ps["next-hop"] == up.address
    assert "error" not in ps  # the upstream answered: gatewise made no error


async def test_existing_proxy_status_is_kept(upstream, gateway):
    """RFC 9209 §2: each intermediary appends its member; the one from further in stays first."""
    up = await upstream("status:502")
    inner = await gateway([up], diagnostics={"proxy_name": "inner"})
    outer = await gateway([f"http://127.0.0.1:{inner.port}"])
    reply = await http(outer.port)
    assert reply.status == 502
    names = [str(item) for item, _ in reply.proxy_status]
    assert names == ["inner", "gatewise"]
    assert reply.proxy_status[0][1]["next-hop"] == up.address
    assert reply.our_status()["received-status"] == 502
    assert reply.all("via") == ["1.1 inner, 1.1 gatewise"]


@pytest.mark.parametrize("mode,token", [("truncate", "http_response_incomplete"),
                                        ("stall", "connection_read_timeout")])
async def test_mid_body_failure_aborts_client(upstream, gateway, mode, token):
    """After the head went out, a cut or stalled upstream aborts the client connection
    (never a clean end that hides the cut) and the cause is recorded."""
    up = await upstream(mode)
    gw = await gateway([up], timeouts=TIMEOUTS)
    started = asyncio.get_running_loop().time()
    data = await raw_exchange(gw.port, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n", timeout=5)
    elapsed = asyncio.get_running_loop().time() - started
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"Content-Length: 1000000" in head
    assert len(body) < 1000000  # the client sees the cut
    recent = gw.proxy.recorder.recent()
    assert recent and recent[0]["error"] == token
    if mode == "stall":
        assert T_IDLE_READ <= elapsed <= T_IDLE_READ + 2


async def test_keepalive_client_survives_error(upstream, gateway):
    """A 502 on a keep-alive connection leaves the connection usable."""
    bad, good = await upstream("refuse"), await upstream("ok")
    raw = {"pools": {"bad": {"servers": [{"url": bad.url}], "retries": 0},
                     "good": {"servers": [{"url": good.url}]}},
           "routes": [{"path_prefix": "/bad", "pool": "bad"}, {"path_prefix": "/", "pool": "good"}]}
    gw = await gateway(None, raw=raw)
    client = await Client.open(gw.port)
    try:
        r1 = await client.request("GET", "/bad")
        r2 = await client.request("GET", "/")
    finally:
        client.close()
    assert r1.status == 502 and r2.status == 200


# -- the rest of SPEC's error table ---------------------------------------------------------
async def test_unroutable_destination(parser):
    """destination_ip_unroutable from a real ENETUNREACH: the proxy runs in a fresh network
    namespace where only loopback exists, so nothing can leave this machine."""
    import json
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    if not shutil.which("unshare") or not shutil.which("ip"):
        pytest.skip("needs unshare (util-linux) and ip (iproute2)")
    root = Path(__file__).resolve().parents[2]
    probe = subprocess.run(["unshare", "-rn", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"unprivileged network namespaces unavailable: {probe.stderr.decode().strip()}")
    run = subprocess.run(["unshare", "-rn", "sh", "-c",
                          f"ip link set lo up && exec {sys.executable} tests/netns_unroutable.py {parser}"],
                         cwd=root, capture_output=True, timeout=60,
                         # a script's sys.path starts at tests/: import this checkout's proxy,
                         # not whichever one the venv's editable install points at
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert run.returncode == 0, run.stderr.decode()
    result = json.loads(run.stdout.decode().strip().splitlines()[-1])
    assert result["status"] == 502
    (member,) = result["proxy_status"]
    assert "error=destination_ip_unroutable" in member and 'next-hop="192.0.2.1:80"' in member
    assert "ENETUNREACH" in member


async def test_pool_without_servers_is_a_configuration_error(gateway):
    raw = {"pools": {"empty": {"servers": []}}, "routes": [{"pool": "empty"}]}
    gw = await gateway(None, raw=raw)
    reply = await http(gw.port)
    assert reply.status == 500
    assert reply.our_status()["error"] == "proxy_configuration_error"
    assert "has no servers" in reply.our_status()["details"]


async def test_pool_connection_cap_is_503_connection_limit_reached(upstream, gateway):
    up = await upstream("slow:1.0")
    gw = await gateway([up], pool={"max_connections": 1})
    first = asyncio.ensure_future(http(gw.port))
    await eventually(lambda: gw.proxy.pools["app"].in_flight == 1, "the first request is in flight")
    second = await http(gw.port)
    assert second.status == 503
    assert second.our_status()["error"] == "connection_limit_reached"
    assert "max_connections = 1" in second.our_status()["details"]
    assert (await first).status == 200


@pytest.mark.pure_python  # patches a function that compiled code would call directly
async def test_a_bug_in_gatewise_is_500_proxy_internal_error(upstream, gateway, monkeypatch, capfd):
    """proxy_internal_error, from a bug injected into our own code (nothing else can make
    one on purpose); the log line carries the traceback."""
    from proxy import headers

    def broken(*args, **kwargs):
        raise RuntimeError("injected bug")

    up = await upstream("ok")
    gw = await gateway([up])
    monkeypatch.setattr(headers, "build_request_head", broken)
    reply = await http(gw.port)
    assert reply.status == 500
    assert reply.our_status()["error"] == "proxy_internal_error"
    assert "RuntimeError" in reply.our_status()["details"]
    assert "injected bug" in capfd.readouterr().err
    assert up.requests_seen == 0


async def test_upstream_that_stops_reading_the_body_is_a_write_timeout(upstream, gateway):
    """connection_write_timeout: the upstream reads the request body at 1 kB/s, so our
    buffer to it stays full for timeouts.idle_read; the client is never blamed."""
    from tests.rawclient import Raw

    up = await upstream("ok", read_rate=1000)
    gw = await gateway([up], pool={"retries": 0}, timeouts={"idle_read": 0.4})
    client = await Raw.open(gw.port)
    body = b"x" * (8 * 1024 * 1024)
    try:
        await client.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(body))
        sender = asyncio.ensure_future(client.send(body))  # blocks once every buffer is full
        await eventually(lambda: gw.proxy.recorder.recent(), "the failure is recorded", timeout=5)
        sender.cancel()
    finally:
        client.close()
    entry = gw.proxy.recorder.recent()[0]
    assert entry["error"] == "connection_write_timeout" and entry["status"] == 504
    assert "timeouts.idle_read" in entry["details"]
    assert [a["error"] for a in entry["attempts"]] == ["connection_write_timeout"]
