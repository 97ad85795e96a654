"""https:// upstreams end to end: real TLS FaultServers with certificates generated at test
time (tests/tlsutil.py), the real proxy on port 0, both codecs and both event loops.

Each failure asserts the status, the Proxy-Status error token (strict RFC 8941 parse), the
words in details that tell a person which TLS problem it is, the JSON body, and that no
request reached a server the proxy must not trust."""

from __future__ import annotations

import re
import ssl

import orjson
import pytest

from diagnostics.faults import FaultServer
from tests.conftest import Client, http
from tests.tlsutil import TestPKI, pki, server_context  # noqa: F401 (pki: fixture)

pytestmark = pytest.mark.both_loops


def https_pool(up: FaultServer, *, host: str = "localhost", **server) -> dict:
    """A raw config: pool "app" with one https:// server on up's port, no retries."""
    return {"pools": {"app": {"servers": [{"url": f"https://{host}:{up.port}", **server}], "retries": 0}}}


def recording_sni(ctx: ssl.SSLContext) -> list[str | None]:
    """Record the SNI each handshake carries (None: none sent)."""
    seen: list[str | None] = []
    ctx.sni_callback = lambda _obj, name, _ctx: seen.append(name)
    return seen


def assert_fails(reply, up: FaultServer, token: str, status: int = 502) -> str:
    """The error is ours, named `token`, in the header and the body; returns details."""
    assert reply.status == status, (reply.status, reply.body)
    ps = reply.our_status()
    assert ps.get("error") == token, reply.all("proxy-status")
    assert str(up.port) in ps["next-hop"]
    body = orjson.loads(reply.body)
    assert body["status"] == status and body["error"] == token
    assert [a["error"] for a in body["attempts"]] == [token]
    return ps["details"]


# -- trust works: verified, pooled, named

async def test_trusted_ca_passes_and_the_tls_connection_is_pooled(upstream, gateway, pki):
    ctx = server_context(pki.good)
    sni = recording_sni(ctx)
    up = await upstream("ok", ssl=ctx)
    gw = await gateway(None, raw=https_pool(up, ca_file=str(pki.ca)))
    for _ in range(2):
        reply = await http(gw.port, "GET", "/")
        assert reply.status == 200 and reply.body == b"hello\n"
        assert reply.our_status() == {}
    assert up.requests_seen == 2
    assert up.connections_accepted == 1   # the second request reused the pooled TLS connection
    assert sni == ["localhost"]           # SNI from the URL host


async def test_big_bodies_both_ways_over_tls(upstream, gateway, pki):
    up = await upstream("ok", ssl=server_context(pki.good))
    gw = await gateway(None, raw=https_pool(up, ca_file=str(pki.ca)))
    reply = await http(gw.port, "GET", "/bytes/3000000", timeout=20)
    assert reply.status == 200 and len(reply.body) == 3_000_000
    c = await Client.open(gw.port)
    try:
        reply = await c.request("POST", "/echo", body=b"u" * 1_000_000, timeout=20)
    finally:
        c.close()
    assert reply.status == 200 and orjson.loads(reply.body)["body_bytes"] == 1_000_000


async def test_tls_verify_false_accepts_a_self_signed_certificate(upstream, gateway, pki):
    up = await upstream("ok", ssl=server_context(pki.self_signed))
    gw = await gateway(None, raw=https_pool(up, tls_verify=False))
    reply = await http(gw.port)
    assert reply.status == 200 and reply.body == b"hello\n"


async def test_sni_setting_is_sent_and_verified(upstream, gateway, pki):
    """sni = "other.example": that name is sent and the certificate is checked against it,
    not against the URL host (localhost)."""
    ctx = server_context(pki.wrong_name)
    sni = recording_sni(ctx)
    up = await upstream("ok", ssl=ctx)
    gw = await gateway(None, raw=https_pool(up, ca_file=str(pki.ca), sni="other.example"))
    reply = await http(gw.port)
    assert reply.status == 200 and reply.body == b"hello\n"
    assert sni == ["other.example"]


# -- certificate problems: tls_certificate_error, details say which

CERT_ROWS = [
    # (certificate, trust the test CA?, words in details: any of)
    ("self_signed", False, ("self-signed", "self signed")),
    ("expired", True, ("expired",)),
    ("wrong_name", True, ("name",)),
    ("other_ca_signed", True, ("unknown CA", "issuer")),
]


@pytest.mark.parametrize("cert, trust, words", CERT_ROWS, ids=[r[0] for r in CERT_ROWS])
async def test_certificate_problem_is_named(upstream, gateway, pki: TestPKI, cert, trust, words):
    up = await upstream("ok", ssl=server_context(getattr(pki, cert)))
    gw = await gateway(None, raw=https_pool(up, **({"ca_file": str(pki.ca)} if trust else {})))
    reply = await http(gw.port)
    details = assert_fails(reply, up, "tls_certificate_error")
    assert any(w in details for w in words), details
    assert up.requests_seen == 0 and up.connections_accepted == 0   # nothing sent to an untrusted server
    entry = gw.proxy.recorder.get(reply.header("x-request-id"))
    assert entry is not None and entry["error"] == "tls_certificate_error"


async def test_wrong_name_on_an_ip_url_is_a_certificate_error(upstream, gateway, pki):
    """No SNI is sent for an IP address; the certificate must carry the IP (wrong_name does not)."""
    up = await upstream("ok", ssl=server_context(pki.wrong_name))
    gw = await gateway(None, raw=https_pool(up, host="127.0.0.1", ca_file=str(pki.ca)))
    details = assert_fails(await http(gw.port), up, "tls_certificate_error")
    assert "127.0.0.1" in details or "IP" in details or "name" in details, details


# -- protocol mismatches

async def test_plain_http_on_an_https_url_is_a_tls_protocol_error(upstream, gateway):
    up = await upstream("ok")   # plaintext HTTP server
    gw = await gateway(None, raw={"pools": {"app": {"servers": [{"url": f"https://127.0.0.1:{up.port}"}],
                                                    "retries": 0}}})
    details = assert_fails(await http(gw.port), up, "tls_protocol_error")
    assert "plain HTTP" in details, details


async def test_tls_on_an_http_url_is_an_http_protocol_error_with_the_fix(upstream, gateway):
    up = await upstream("tls")   # answers plaintext with a TLS alert record
    gw = await gateway([up], pool={"retries": 0})
    details = assert_fails(await http(gw.port), up, "http_protocol_error")
    # The issue says "upstream speaks TLS; use https://", SPEC's table "upstream speaks TLS? use https://"
    assert re.search(r"upstream speaks TLS[;?] use https://", details), details


# -- alerts from the server: tls_alert_received with alert-id and alert-message (RFC 9209 §2.3.13)

async def test_client_certificate_required_is_alert_116(upstream, gateway, pki):
    """TLS 1.3: the proxy's handshake completes; the server then rejects the missing client
    certificate with fatal alert 116, which the proxy reads in place of a response."""
    up = await upstream("ok", ssl=server_context(pki.good, require_client_cert=True, ca=pki.ca))
    gw = await gateway(None, raw=https_pool(up, ca_file=str(pki.ca)))
    reply = await http(gw.port)
    assert_fails(reply, up, "tls_alert_received")
    ps = reply.our_status()
    assert ps["alert-id"] == 116 and ps["alert-message"] == "certificate_required", ps  # RFC 9209 §2.3.15: the registry description
    assert up.requests_seen == 0 and up.tls_handshake_failures == 1


async def test_alert_during_the_handshake_is_named(upstream, gateway, pki):
    """An SNI the server does not serve: fatal alert 112 unrecognized_name during the handshake."""
    ctx = server_context(pki.good)
    ctx.sni_callback = lambda _obj, _name, _ctx: ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
    up = await upstream("ok", ssl=ctx)
    gw = await gateway(None, raw=https_pool(up, ca_file=str(pki.ca)))
    reply = await http(gw.port)
    assert_fails(reply, up, "tls_alert_received")
    ps = reply.our_status()
    assert ps["alert-id"] == 112 and ps["alert-message"] == "unrecognized_name", ps
    assert up.requests_seen == 0 and up.tls_handshake_failures == 1


# -- regressions from the review of the TLS work ----------------------------------------------
def _tls_server_that_breaks_after_reading(ctx: ssl.SSLContext, seen: list[bytes]) -> tuple[int, object]:
    """One-shot https upstream in a thread: completes the handshake, reads a request head,
    then writes plaintext into the TLS stream (a crashed TLS terminator) and closes."""
    import os
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(10)

    def run() -> None:
        try:
            conn, _ = listener.accept()
            conn.settimeout(10)
            tls = ctx.wrap_socket(conn, server_side=True)
            data = b""
            while b"\r\n\r\n" not in data:
                data += tls.recv(65536)
            seen.append(data.split(b"\r\n")[0])
            raw = socket.socket(fileno=os.dup(tls.fileno()))
            raw.sendall(b"HTTP/1.1 500 oops\r\n\r\n")
            raw.close()
            tls.close()
        except OSError:
            pass
        finally:
            listener.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return listener.getsockname()[1], thread


async def test_tls_broken_after_the_request_is_not_retry_safe(upstream, gateway, pki):
    """Regression: an SSL error after the handshake was mapped to a connect-phase (always
    retry-safe) TLS error, so a POST the upstream had already read was sent again to the
    next server. Now: connection_terminated, and a POST is not replayed."""
    import asyncio

    seen: list[bytes] = []
    port, thread = _tls_server_that_breaks_after_reading(server_context(pki.good), seen)
    good = await upstream("ok", ssl=server_context(pki.good))
    gw = await gateway(None, raw={"pools": {"app": {"retries": 1, "passive": {"max_fails": 0}, "servers": [
        {"url": f"https://127.0.0.1:{port}", "ca_file": str(pki.ca), "weight": 2},
        {"url": good.url, "ca_file": str(pki.ca)}]}}})
    reply = await http(gw.port, "POST", "/pay", body=b"amount=100")
    await asyncio.get_running_loop().run_in_executor(None, thread.join, 5)
    assert seen == [b"POST /pay HTTP/1.1"]
    assert reply.status == 502
    assert reply.our_status()["error"] == "connection_terminated"
    assert "TLS session failed after the request was sent" in reply.our_status()["details"]
    assert good.requests_seen == 0  # never replayed


async def test_port_that_never_answers_the_handshake_is_a_tls_problem(upstream, gateway):
    """Regression: an https:// URL on a port that accepts TCP but never answers the
    ClientHello was reported as connection_timeout (check firewalls), though the TCP
    connect had succeeded."""
    plain = await upstream("hang")
    gw = await gateway([f"https://127.0.0.1:{plain.port}"], pool={"retries": 0},
                       timeouts={"connect": 0.3})
    reply = await http(gw.port)
    assert reply.status == 502
    ps = reply.our_status()
    assert ps["error"] == "tls_protocol_error"
    assert "gave no TLS answer" in ps["details"]
    assert 0.3 <= reply.elapsed < 3
