"""Safety on real loopback sockets: no request smuggling, bounded memory, client timeouts,
and nothing leaks when a client goes away.

Every case runs on both codecs (llhttp, h11). `parser` is parametrized here directly (it
overrides the conftest fixture of the same name) so that one (case, codec) pair can carry
its own strict xfail where the proxy is wrong; each such mark names the bug.

Clients here are raw non-blocking sockets rather than StreamReader: when the proxy
answers and closes with unread client bytes in its receive queue, the kernel sends RST
after the answer, and StreamReader.read() would raise and drop the answer it already
buffered. sock_recv returns the queued answer first, then the reset.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.rawclient import Raw, eventually, forward_tasks
from tests.conftest import Reply, ReplyReader

CODECS = ("llhttp", "h11")


# -- helpers ----------------------------------------------------------------------------------
async def exchange(port: int, data: bytes, timeout: float = 1.0) -> tuple[bytes, bool, float]:
    """Send raw bytes; return (everything received until close or timeout, closed, elapsed)."""
    loop = asyncio.get_running_loop()
    client = await Raw.open(port)
    started = loop.time()
    try:
        await client.send(data)
        out, closed = await client.recv_until_close(timeout)
        return out, closed, loop.time() - started
    finally:
        client.close()


def parse_replies(data: bytes, methods: tuple[str, ...] = ("GET",)) -> list[Reply]:
    """Parse consecutive responses strictly with h11 (one per method); raises on garbage."""
    replies: list[Reply] = []
    conn = None
    eof_fed = False
    for method in methods:
        rr = ReplyReader(method, conn)
        if conn is None:
            rr.conn.receive_data(data)
        reply = rr.poll()
        if reply is None and not eof_fed:
            rr.conn.receive_data(b"")  # nothing more came before the proxy closed
            eof_fed = True
            reply = rr.poll()
        if reply is None:
            raise AssertionError(f"incomplete response in {data[:200]!r}")
        replies.append(reply)
        conn = rr.conn
    return replies


def pooled(gw) -> int:
    """Upstream connections idle in the proxy's pools (kept on purpose, keep-alive)."""
    return sum(len(idle) for pool in gw.proxy.pools.values() for idle in pool.idle.values())


async def assert_no_leaks(gw, up, timeout: float = 3.0, *, pool_ok: bool = False) -> None:
    """Nothing survives a finished or abandoned exchange: no client connection, no
    forward() task, nothing counted in flight, and no upstream connection (with
    `pool_ok`, except the idle pooled ones of completed exchanges; an aborted exchange's
    connection is never pooled)."""
    await eventually(lambda: not gw.proxy.connections, "gw.proxy.connections empty", timeout)
    await eventually(lambda: not forward_tasks(), "no forward() task left", timeout)
    # the fast path has no task to look for: what it holds is counted in flight
    await eventually(lambda: all(p.in_flight == 0 and not any(s.active_requests for s in p.servers)
                                 for p in gw.proxy.pools.values()), "nothing counted in flight", timeout)
    if pool_ok:
        await eventually(lambda: len(up._conns) == pooled(gw),
                         "the upstream's connections closed (except idle pooled ones)", timeout)
    else:
        await eventually(lambda: not up._conns, "the upstream's connections closed", timeout)
        assert pooled(gw) == 0


def assert_rejected(reply: Reply, status: int, gw=None) -> None:
    """A gatewise-made client error: status, Proxy-Status http_request_error (parsed
    strictly), a request id, Connection: close; with `gw`, the same evidence in /debug."""
    assert reply.status == status, reply
    assert reply.our_status().get("error") == "http_request_error", reply.headers
    request_id = reply.header("x-request-id")
    assert request_id, reply.headers
    assert reply.header("connection") == "close", reply.headers
    if gw is not None:
        entry = gw.proxy.recorder.get(request_id)
        assert entry is not None, f"no /debug entry for {request_id}"
        assert (entry["status"], entry["error"]) == (status, "http_request_error"), entry


def by_codec(cases, bugs: dict[tuple[str, str], str]):
    """pytest params for every (case, codec), with a strict xfail where a bug is known."""
    out = []
    for case in cases:
        for codec in CODECS:
            reason = bugs.get((case[0], codec))
            marks = [pytest.mark.xfail(strict=True, reason=f"BUG: {reason}")] if reason else []
            out.append(pytest.param(*case, codec, marks=marks, id=f"{case[0]}-{codec}"))
    return out


# -- 1. smuggling and ambiguous framing ---------------------------------------------------------
H = b"Host: t\r\n"
SMUGGLING = [
    ("cl_and_te", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"0\r\n\r\n"),
    ("te_then_cl", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
                   b"0\r\n\r\n"),
    ("two_content_lengths", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"),
    ("bad_chunk_size", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"),
    ("chunk_size_overflow", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
                            b"ffffffffffffffffff\r\nabc\r\n0\r\n\r\n"),
    ("obs_fold", b"GET / HTTP/1.1\r\n" + H + b"X-A: one\r\n two\r\n\r\n"),
    ("bare_lf", b"GET / HTTP/1.1\nHost: t\nX-A: b\n\n"),
    ("bare_cr_in_value", b"GET / HTTP/1.1\r\n" + H + b"X-A: b\rc\r\n\r\n"),
    ("space_before_colon", b"GET / HTTP/1.1\r\nHost : t\r\n\r\n"),
    ("nul_in_value", b"GET / HTTP/1.1\r\n" + H + b"X-A: b\x00c\r\n\r\n"),
    ("te_gzip", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip\r\n\r\nabc"),
    ("te_chunked_then_gzip", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, gzip\r\n\r\nabc"),
    ("invalid_method", b"G(T / HTTP/1.1\r\n" + H + b"\r\n"),
    ("space_in_method", b"GE T / HTTP/1.1\r\n" + H + b"\r\n"),
    ("te_twice", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"0\r\n\r\n"),
    ("bad_chunk_terminator", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n0\r\n\r\n"),
    ("two_hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
    ("http11_without_host", b"GET / HTTP/1.1\r\n\r\n"),
    ("trailer_obs_fold", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
                         b"3\r\nabc\r\n0\r\nX-T: one\r\n two\r\n\r\n"),
    ("trailer_bare_lf", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
                        b"3\r\nabc\r\n0\r\nX-T: one\n\r\n"),
]
SMUGGLING_BUGS = {
    ("chunk_size_overflow", "h11"): "h11 codec accepts an 18-hex-digit chunk size and waits for the body",
    ("trailer_obs_fold", "h11"): "h11 codec unfolds obs-fold in trailers and forwards the request "
                                 "(check_head_bytes only runs on the head)",
    ("trailer_bare_lf", "h11"): "h11 codec accepts a bare LF in trailers and forwards the request "
                                "(check_head_bytes only runs on the head)",
}


@pytest.mark.parametrize("name,data,parser", by_codec(SMUGGLING, SMUGGLING_BUGS))
async def test_ambiguous_framing_is_400(upstream, gateway, name, data, parser):
    """SPEC: ambiguous framing is answered 400 by the proxy and never reaches the upstream."""
    up = await upstream("ok")
    gw = await gateway([up])
    raw, closed, _ = await exchange(gw.port, data)
    assert closed, f"the proxy kept the connection open; received {raw[:200]!r}"
    assert raw, "the proxy closed without an answer"
    (reply,) = parse_replies(raw)
    assert_rejected(reply, 400)
    await assert_no_leaks(gw, up)
    assert up.requests_seen == 0


@pytest.mark.parametrize("parser", ["llhttp", "h11"])
async def test_unsupported_transfer_coding_is_not_forwarded(upstream, gateway, parser):
    """A transfer coding gatewise does not implement (gzip before chunked) cannot be
    re-framed faithfully: refuse it (400, or 501 per RFC 9112 §6.1) instead of forwarding."""
    up = await upstream("ok")
    gw = await gateway([up])
    data = (b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
            b"5\r\n\x1f\x8b\x08\x00\x00\r\n0\r\n\r\n")
    raw, closed, _ = await exchange(gw.port, data)
    await assert_no_leaks(gw, up, pool_ok=True)
    assert up.requests_seen == 0, up.last_request
    (reply,) = parse_replies(raw, ("POST",))
    assert reply.status in (400, 501), reply
    assert reply.our_status().get("error") == "http_request_error"


@pytest.mark.parametrize("parser", CODECS)
async def test_smuggled_request_never_reaches_upstream(upstream, gateway, parser):
    """Regression: the h11 codec accepted Transfer-Encoding with Content-Length and
    scan_request kept the last framing header, so the dechunked body went upstream under
    "Content-Length: 3" and the upstream read the rest as a second request
    ("GET /smuggled"): the classic TE.CL desync."""
    up = await upstream("ok")
    gw = await gateway([up])
    inner = b"GET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n"
    body = b"abc" + inner
    data = (b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
            + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n")
    raw, closed, _ = await exchange(gw.port, data)
    await assert_no_leaks(gw, up)
    assert up.requests_seen == 0, up.last_request
    (reply,) = parse_replies(raw)
    assert_rejected(reply, 400)


@pytest.mark.parametrize("parser", CODECS)
async def test_pipelined_valid_then_smuggled(upstream, gateway, parser):
    """A valid request pipelined with a smuggling attempt: the first is answered by the
    upstream, the second gets 400 + close, and the upstream saw exactly one request.
    Regression: the rejection set `closing` at once, so the first response went out with
    Connection: close and the queued 400 was never sent (and h11 forwarded the second)."""
    up = await upstream("ok")
    gw = await gateway([up])
    data = (b"GET /first HTTP/1.1\r\nHost: t\r\n\r\n"
            b"POST /second HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"0\r\n\r\n")
    raw, closed, _ = await exchange(gw.port, data)
    assert closed
    first, second = parse_replies(raw, ("GET", "POST"))
    assert first.status == 200 and first.body == b"hello\n", (first, raw[:300])
    assert first.header("x-upstream") == up.address
    assert_rejected(second, 400)
    await assert_no_leaks(gw, up, pool_ok=True)
    assert up.requests_seen == 1
    assert up.last_request["path"] == "/first"


EVIDENCE = [
    ("bare_lf_in_head", b"GET / HTTP/1.1\nHost: t\n\n", 400),
    ("head_over_limit", b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"b" * 8000 + b"\r\n\r\n", 431),
    ("bad_chunk_size", b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
]


@pytest.mark.parametrize("parser", CODECS)
@pytest.mark.parametrize("case,data,status", [pytest.param(*c, id=c[0]) for c in EVIDENCE])
async def test_rejection_evidence_is_kept_under_its_request_id(upstream, gateway, parser, case, data, status):
    """Regression: a rejection before an exchange existed (an error in the head) was
    recorded under request_id "-" while the response carried a fresh X-Request-Id, so the
    id led nowhere in /debug and such entries overwrote each other. SPEC: the request id
    of every error response leads to its evidence; two in a row are both findable."""
    up = await upstream("ok")
    gw = await gateway([up], limits={"max_request_header_bytes": HEAD_LIMIT})
    ids = []
    for _ in range(2):
        raw, _, _ = await exchange(gw.port, data)
        (reply,) = parse_replies(raw)
        assert_rejected(reply, status)
        ids.append(reply.header("x-request-id"))
    assert ids[0] != ids[1]
    for request_id in ids:
        entry = gw.proxy.recorder.get(request_id)
        assert entry is not None, f"no /debug entry for {request_id}; have {list(gw.proxy.recorder._ring)}"
        assert (entry["status"], entry["error"]) == (status, "http_request_error"), entry


# -- 2. limits -------------------------------------------------------------------------------------
HEAD_LIMIT = 4096


@pytest.mark.parametrize("parser", CODECS)
async def test_head_over_limit_is_431(upstream, gateway, parser):
    up = await upstream("ok")
    gw = await gateway([up], limits={"max_request_header_bytes": HEAD_LIMIT})
    headers = b"".join(b"X-Pad-%02d: %s\r\n" % (i, b"p" * 200) for i in range(30))  # ~6.5 KB
    raw, closed, elapsed = await exchange(gw.port, b"GET / HTTP/1.1\r\nHost: t\r\n" + headers + b"\r\n")
    assert closed
    (reply,) = parse_replies(raw)
    assert_rejected(reply, 431)
    assert elapsed < 2
    await assert_no_leaks(gw, up)
    assert up.connections_accepted == 0


@pytest.mark.parametrize("parser", CODECS)
async def test_pipelined_head_over_limit_is_431(upstream, gateway, parser):
    """Regression: an oversized head pipelined behind a small request in the same read
    reached the upstream (llhttp counted it from zero). The first request is answered,
    the second refused, and only the first reaches the upstream."""
    up = await upstream("ok")
    gw = await gateway([up], limits={"max_request_header_bytes": HEAD_LIMIT})
    headers = b"".join(b"X-Pad-%02d: %s\r\n" % (i, b"p" * 200) for i in range(30))  # ~6.5 KB
    raw, closed, _ = await exchange(gw.port, b"GET /a HTTP/1.1\r\nHost: t\r\n\r\n"
                                    b"GET /b HTTP/1.1\r\nHost: t\r\n" + headers + b"\r\n")
    assert closed
    first, second = parse_replies(raw, ("GET", "GET"))
    assert first.status == 200
    assert_rejected(second, 431)
    assert up.requests_seen == 1 and up.last_request["path"] == "/a"


@pytest.mark.parametrize("parser", CODECS)
async def test_head_just_under_limit_passes(upstream, gateway, parser):
    up = await upstream("ok")
    gw = await gateway([up], limits={"max_request_header_bytes": HEAD_LIMIT})
    headers = b"".join(b"X-Pad-%02d: %s\r\n" % (i, b"p" * 200) for i in range(12))  # ~2.6 KB
    raw, closed, _ = await exchange(gw.port, b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
                                    + headers + b"\r\n")
    (reply,) = parse_replies(raw)
    assert reply.status == 200
    assert up.requests_seen == 1


@pytest.mark.parametrize("parser", CODECS)
@pytest.mark.parametrize("limit", [HEAD_LIMIT, 65536])
async def test_one_enormous_header_is_431(upstream, gateway, parser, limit):
    """A single 200 KiB header field, complete."""
    up = await upstream("ok")
    gw = await gateway([up], limits={"max_request_header_bytes": limit})
    data = b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"b" * (200 * 1024) + b"\r\n\r\n"
    raw, closed, elapsed = await exchange(gw.port, data)
    assert closed
    (reply,) = parse_replies(raw)
    assert_rejected(reply, 431)
    assert elapsed < 2
    assert up.connections_accepted == 0


@pytest.mark.parametrize("parser", CODECS)
async def test_endless_header_is_cut_off(upstream, gateway, parser):
    """A header value that never ends: the proxy must answer 431 on its own, well before
    client_header (5 s here) would fire, i.e. it stops buffering at a bound rather than
    waiting for the end of a head that never comes. The client stops after 2 MiB."""
    up = await upstream("ok")
    gw = await gateway([up], limits={"max_request_header_bytes": HEAD_LIMIT},
                       timeouts={"client_header": 5.0})
    loop = asyncio.get_running_loop()
    client = await Raw.open(gw.port)
    started = loop.time()
    try:
        sent = 0
        if await client.send(b"GET / HTTP/1.1\r\nHost: t\r\nX-Endless: "):
            piece = b"e" * 65536
            while sent < 2 * 1024 * 1024 and await client.send(piece):
                sent += len(piece)
        raw, closed = await client.recv_until_close(3.0)
    finally:
        client.close()
    assert closed, "the proxy kept reading an endless header"
    assert loop.time() - started < 3.0
    (reply,) = parse_replies(raw)
    assert_rejected(reply, 431)
    assert up.connections_accepted == 0


BODY_LIMIT = 1000


@pytest.mark.parametrize("parser", CODECS)
async def test_content_length_over_limit_is_413_before_body(upstream, gateway, parser):
    """Only the head is sent: the 413 must come from the Content-Length alone, and no
    upstream connection is even opened."""
    up = await upstream("ok")
    gw = await gateway([up], limits={"max_request_body_bytes": BODY_LIMIT})
    raw, closed, elapsed = await exchange(
        gw.port, b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 10000000\r\n\r\n")
    assert closed
    (reply,) = parse_replies(raw, ("POST",))
    assert_rejected(reply, 413)
    assert elapsed < 2
    await assert_no_leaks(gw, up)
    assert up.connections_accepted == 0 and up.requests_seen == 0
    entry = gw.proxy.recorder.get(reply.header("x-request-id"))
    assert entry is not None and entry["status"] == 413, entry


@pytest.mark.parametrize("parser", CODECS)
async def test_chunked_body_over_limit_is_413(upstream, gateway, parser):
    """A chunked body that grows past the limit while the upstream waits for it (no
    response yet): 413, the upstream connection is closed, and the evidence says 413."""
    up = await upstream("ok")
    gw = await gateway([up], limits={"max_request_body_bytes": BODY_LIMIT})
    client = await Raw.open(gw.port)
    try:
        await client.send(b"POST /upload HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                          b"258\r\n" + b"x" * 600 + b"\r\n")
        # the head and first chunk reach the upstream before the limit is crossed
        await eventually(lambda: up.connections_accepted >= 1, "the upstream connection opened")
        await client.send(b"258\r\n" + b"y" * 600 + b"\r\n")
        raw, closed = await client.recv_until_close(3.0)
    finally:
        client.close()
    assert closed
    (reply,) = parse_replies(raw, ("POST",))
    assert_rejected(reply, 413)
    await assert_no_leaks(gw, up)
    assert up.requests_seen == 0
    assert gw.proxy.pools["app"].servers[0].failures_total == 0
    entry = gw.proxy.recorder.get(reply.header("x-request-id"))
    assert entry is not None and (entry["status"], entry["error"]) == (413, "http_request_error"), entry


@pytest.mark.parametrize("parser", CODECS)
@pytest.mark.parametrize("chunked", [False, True], ids=["length", "chunked"])
async def test_body_under_limit_passes(upstream, gateway, parser, chunked):
    up = await upstream("ok")
    gw = await gateway([up], limits={"max_request_body_bytes": BODY_LIMIT})
    body = b"z" * BODY_LIMIT  # exactly at the limit
    if chunked:
        data = (b"POST /echo HTTP/1.1\r\nHost: t\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"1f4\r\n" + body[:500] + b"\r\n1f4\r\n" + body[500:] + b"\r\n0\r\n\r\n")
    else:
        data = (b"POST /echo HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
                % len(body) + body)
    raw, closed, _ = await exchange(gw.port, data)
    (reply,) = parse_replies(raw, ("POST",))
    assert reply.status == 200, reply
    assert up.requests_seen == 1 and up.last_request["body_bytes"] == BODY_LIMIT


# -- 3. client timeouts ---------------------------------------------------------------------------
T_CLIENT = 0.3


@pytest.mark.parametrize("parser", CODECS)
async def test_half_a_head_gets_408(upstream, gateway, parser):
    up = await upstream("ok")
    gw = await gateway([up], timeouts={"client_header": T_CLIENT})
    raw, closed, elapsed = await exchange(gw.port, b"GET / HTTP/1.1\r\nHost: t\r\nX-Half: ", timeout=5)
    assert closed
    (reply,) = parse_replies(raw)
    assert_rejected(reply, 408)
    assert T_CLIENT * 0.9 <= elapsed <= T_CLIENT + 1.7, elapsed
    assert up.connections_accepted == 0


@pytest.mark.parametrize("parser", CODECS)
async def test_half_a_pipelined_head_gets_408_after_the_request_before_it(upstream, gateway, parser):
    """Regression: half a head that came in the same read as the request before it was
    timed by client_idle once that request's response was out (10 s here, then a quiet
    close), not by client_header. Like nginx, its client_header starts when the proxy
    can serve it: when the response before it is out (RFC 9112 §9.3.2: in order)."""
    up = await upstream("ok")
    gw = await gateway([up], timeouts={"client_header": T_CLIENT, "client_idle": 10.0})
    raw, closed, elapsed = await exchange(
        gw.port, b"GET / HTTP/1.1\r\nHost: t\r\n\r\nGET / HTTP/1.1\r\nHost: t\r\nX-Half: ", timeout=5)
    assert closed, f"half a pipelined head held the connection {elapsed:.1f} s (client_header {T_CLIENT} s)"
    first, second = parse_replies(raw, ("GET", "GET"))
    assert first.status == 200, first
    assert_rejected(second, 408, gw)
    assert T_CLIENT * 0.9 <= elapsed <= T_CLIENT + 1.7, elapsed
    assert up.requests_seen == 1


@pytest.mark.parametrize("parser", CODECS)
async def test_silent_connection_is_closed_after_client_header(upstream, gateway, parser):
    """A client that connects and sends nothing: closed once client_header runs out
    (a 408 first is allowed, RFC 9110 §15.5.9; nothing else is)."""
    up = await upstream("ok")
    gw = await gateway([up], timeouts={"client_header": T_CLIENT})
    loop = asyncio.get_running_loop()
    client = await Raw.open(gw.port)
    started = loop.time()
    try:
        raw, closed = await client.recv_until_close(5.0)
    finally:
        client.close()
    elapsed = loop.time() - started
    assert closed
    assert T_CLIENT * 0.9 <= elapsed <= T_CLIENT + 1.7, elapsed
    if raw:
        (reply,) = parse_replies(raw)
        assert_rejected(reply, 408)
    await eventually(lambda: not gw.proxy.connections, "gw.proxy.connections empty")


@pytest.mark.parametrize("parser", CODECS)
async def test_idle_keepalive_connection_is_closed(upstream, gateway, parser):
    up = await upstream("ok")
    gw = await gateway([up], timeouts={"client_idle": T_CLIENT})
    loop = asyncio.get_running_loop()
    client = await Raw.open(gw.port)
    try:
        await client.send(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        raw, closed = await client.recv_until_close(timeout=T_CLIENT / 3)
        # the response arrived and the connection stayed open (keep-alive)
        (reply,) = parse_replies(raw)
        assert reply.status == 200 and not closed
        idle_from = loop.time()
        rest, closed = await client.recv_until_close(timeout=5.0)
    finally:
        client.close()
    assert closed and rest == b""
    assert T_CLIENT * 0.5 <= loop.time() - idle_from <= T_CLIENT + 1.7
    await eventually(lambda: not gw.proxy.connections, "gw.proxy.connections empty")


@pytest.mark.parametrize("parser", CODECS)
async def test_a_client_that_does_not_read_is_timed_by_client_idle_not_client_header(upstream, gateway, parser):
    """Regression: with the client's buffer full (pause_writing), a head that came in two
    reads kept its client_header deadline after it was complete, and the request then in
    flight was aborted as "client read nothing" at client_header instead of client_idle.
    (pause_writing is called as the transport would when its buffer passes high water.)"""
    up = await upstream("slow:0.6")  # answers after 0.6 s: longer than client_header
    gw = await gateway([up], timeouts={"client_header": T_CLIENT, "client_idle": 5.0})
    client = await Raw.open(gw.port)
    try:
        await client.send(b"GET /first HTTP/1.1\r\nHost: t\r\n\r\n")
        (downstream,) = await eventually(lambda: list(gw.proxy.connections) or None, "the connection")
        await eventually(lambda: downstream.state == "idle" and downstream.current is None,
                         "the first exchange done")
        downstream.pause_writing()
        await client.send(b"GET /second HTTP/1.1\r\nHost: t\r\n")
        await eventually(lambda: downstream.state == "head", "the second head begun")  # read apart
        await client.send(b"Connection: close\r\n\r\n")
        # (still "paused" when the answer comes: the transport itself has room, so the
        # response is written, then the connection closes as asked)
        rest, closed = await client.recv_until_close(5.0)
    finally:
        client.close()
    assert closed
    _, second = parse_replies(rest, ("GET", "GET"))
    assert second.status == 200, second
    assert _last_error(gw) is None


# -- 4. a client that goes away leaks nothing ------------------------------------------------------
def _last_error(gw) -> str | None:
    recent = gw.proxy.recorder.recent()
    return recent[0]["error"] if recent else None


# A correct proxy cleans up within milliseconds.
CLEANUP_S = 1.5


@pytest.mark.parametrize("how", ["close", "reset"])
@pytest.mark.parametrize("parser", CODECS)
async def test_client_gone_while_upstream_hangs(upstream, gateway, parser, how):
    """The upstream read the request and never answers; the client gives up."""
    up = await upstream("hang")
    gw = await gateway([up])  # response_header stays at 30 s: only the client's exit can end this
    client = await Raw.open(gw.port)
    await client.send(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
    await up.wait_requests(1)
    client.close() if how == "close" else client.reset()
    await assert_no_leaks(gw, up, CLEANUP_S)
    assert _last_error(gw) == "client_disconnected"
    assert gw.proxy.pools["app"].servers[0].failures_total == 0


@pytest.mark.parametrize("how", ["close", "reset"])
@pytest.mark.parametrize("parser", CODECS)
async def test_client_gone_mid_download(upstream, gateway, parser, how):
    up = await upstream("ok")
    gw = await gateway([up])
    client = await Raw.open(gw.port)
    await client.send(b"GET /bytes/50000000 HTTP/1.1\r\nHost: t\r\n\r\n")
    assert await client.recv_some(1_000_000) >= 1_000_000
    client.close() if how == "close" else client.reset()
    await assert_no_leaks(gw, up, CLEANUP_S)
    assert _last_error(gw) == "client_disconnected"
    assert gw.proxy.pools["app"].servers[0].failures_total == 0


@pytest.mark.parametrize("how", ["close", "reset"])
@pytest.mark.parametrize("parser", CODECS)
async def test_client_gone_mid_upload(upstream, gateway, parser, how):
    up = await upstream("ok")
    gw = await gateway([up])
    client = await Raw.open(gw.port)
    await client.send(b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 10000000\r\n\r\n" + b"u" * 200_000)
    await eventually(lambda: up.connections_accepted >= 1, "the upstream connection opened")
    client.close() if how == "close" else client.reset()
    await assert_no_leaks(gw, up, CLEANUP_S)
    assert up.requests_seen == 0
    assert _last_error(gw) == "client_disconnected"
    assert gw.proxy.pools["app"].servers[0].failures_total == 0


@pytest.mark.parametrize("parser", CODECS)
async def test_refused_head_behind_pipelined_requests(upstream, gateway, parser):
    """Regression: a head refused in on_request_head (two Host fields) behind queued
    pipelined requests emptied the queue, so the valid requests before it went unanswered."""
    up = await upstream("ok")
    gw = await gateway([up])
    data = (b"GET /echo?i=1 HTTP/1.1\r\nHost: t\r\n\r\n"
            b"GET /echo?i=2 HTTP/1.1\r\nHost: t\r\n\r\n"
            b"GET /echo?i=3 HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
    raw, closed, _ = await exchange(gw.port, data)
    assert closed
    replies = parse_replies(raw, ("GET", "GET", "GET"))
    assert [r.status for r in replies] == [200, 200, 400]
    assert_rejected(replies[2], 400)
    assert up.requests_seen == 2
