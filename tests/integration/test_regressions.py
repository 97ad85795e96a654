"""Regressions from the review of 0d265df, one test per bug, on real loopback sockets.

Each regression test names its bug in its docstring and failed before 03727e9 fixed it
(on the codec that had the bug: tests 4 and 7 were h11- and llhttp-only bugs, and h11
already refused the transfer coding of test 5). Two more cover what 03727e9 left wrong or
introduced, fixed in the commit after it.

Conventions as in test_safety.py: raw non-blocking sockets, `eventually()` for every wait
on a condition, bounded loops, and sleeps only as the pacing of a fixed observation window.

Kernel buffers on loopback are autotuned to megabytes, which would absorb the few hundred
KB these scenarios need to hold back. Where a bug needs the proxy's own write buffer to
fill, the test shrinks a socket buffer: SO_RCVBUF on its own client or upstream socket
(before connect/listen, so the advertised window is small), and SO_SNDBUF on the proxy's
socket (the accepted client socket, or the upstream socket via a monkeypatched
connection_made). That only changes how soon the kernel says "full", never the proxy's
logic.
"""

from __future__ import annotations

import asyncio
import re
import socket

import h11
import pytest

import diagnostics.faults as faults
import proxy.upstream_conn as upstream_conn
from tests.rawclient import Raw, eventually, forward_tasks
from tests.conftest import Client, http
from tests.integration.test_safety import assert_rejected, parse_replies

MiB = 1 << 20
SMALL_RCVBUF = 4096
SMALL_SNDBUF = 8192


# -- helpers ----------------------------------------------------------------------------------
def proxy_client(gw):
    """The proxy's only client connection (DownstreamProtocol)."""
    (conn,) = gw.proxy.connections
    return conn


def shrink_sndbuf(transport) -> None:
    transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_SNDBUF)


async def replies(raw: Raw, methods: tuple[str, ...], timeout: float = 5.0,
                  last_head_only: bool = False) -> list[tuple[int, dict, bytes]]:
    """Read consecutive responses with h11 from a raw client: [(status, headers, body)];
    with `last_head_only`, stop at the last one's head (its body is then b"")."""
    conn = h11.Connection(h11.CLIENT)
    out = []
    async with asyncio.timeout(timeout):
        for i, method in enumerate(methods):
            if i:
                conn.start_next_cycle()
            conn.send(h11.Request(method=method, target="/", headers=[("Host", "t")]))
            conn.send(h11.EndOfMessage())
            status, headers, body = 0, {}, bytearray()
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await raw.loop.sock_recv(raw.sock, 65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    headers = {n.decode(): v.decode("latin-1") for n, v in event.headers}
                    if last_head_only and i == len(methods) - 1:
                        break
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    raise AssertionError(f"closed before response {i + 1} was complete")
            out.append((status, headers, bytes(body)))
    return out


# -- a scripted upstream ----------------------------------------------------------------------
class Scripted:
    """A tiny upstream on raw non-blocking sockets: `handler(sock, index)` runs for each
    accepted connection (index 0, 1, ...). Raw sockets read nothing on their own, so bytes
    the handler does not read stay in the kernel (StreamReader would read them eagerly)."""

    def __init__(self, handler, rcvbuf: int | None = None) -> None:
        self.handler, self.rcvbuf = handler, rcvbuf
        self.accepted = 0
        self.loop = asyncio.get_running_loop()
        self._tasks: list[asyncio.Task] = []
        self._socks: list[socket.socket] = []
        self._listener: socket.socket | None = None

    async def start(self) -> "Scripted":
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socks.append(ls)
        if self.rcvbuf is not None:   # inherited by accepted sockets: a small advertised window
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        ls.bind(("127.0.0.1", 0))
        ls.listen(16)
        ls.setblocking(False)
        self._listener = ls
        self.port = ls.getsockname()[1]
        self._tasks.append(self.loop.create_task(self._accept()))
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _accept(self) -> None:
        while True:
            sock, _ = await self.loop.sock_accept(self._listener)
            sock.setblocking(False)
            self._socks.append(sock)
            index, self.accepted = self.accepted, self.accepted + 1
            self._tasks.append(self.loop.create_task(self._run(sock, index)))

    async def _run(self, sock: socket.socket, index: int) -> None:
        try:
            await self.handler(sock, index)
        except (ConnectionError, OSError):
            pass
        finally:
            sock.close()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for sock in self._socks:
            sock.close()

    # helpers for handlers
    async def read_head(self, sock: socket.socket, buf: bytes) -> tuple[bytes | None, bytes]:
        """(head, rest) of the next request; (None, b"") on EOF."""
        for _ in range(1024):   # bounded: a head is far smaller than 1024 reads
            end = buf.find(b"\r\n\r\n")
            if end != -1:
                return buf[:end + 4], buf[end + 4:]
            piece = await self.loop.sock_recv(sock, 65536)
            if not piece:
                return None, b""
            buf += piece
        raise AssertionError("request head never ended")

    async def read_body(self, sock: socket.socket, buf: bytes, n: int) -> bytes | None:
        """Consume an n-byte body after `buf`; returns what follows it, None on EOF."""
        while len(buf) < n:
            piece = await self.loop.sock_recv(sock, 65536)
            if not piece:
                return None
            buf += piece
        return buf[n:]


def content_length(head: bytes) -> int:
    m = re.search(rb"\r\ncontent-length:\s*(\d+)", head, re.IGNORECASE)
    return int(m.group(1)) if m else 0


@pytest.fixture
async def scripted():
    started: list[Scripted] = []

    async def make(handler, **opts) -> Scripted:
        server = await Scripted(handler, **opts).start()
        started.append(server)
        return server

    yield make
    for server in started:
        await server.close()


# -- 1. pipelined exchange behind a client that does not read ---------------------------------
async def test_pipelined_exchange_does_not_bypass_backpressure(upstream, gateway, parser, monkeypatch):
    """Regression: when the response before it ended while the client's write side was
    paused, a pipelined exchange started anyway and its upstream was never paused, so a
    client that reads nothing made the proxy buffer the whole 200 MB body (150 MB after
    0.5 s) behind a 64 KiB high-water mark. Bound here: under 4 MiB buffered toward the
    client and under 32 MiB written by the upstream during a 0.8 s window."""
    big = 200_000_000
    pumped = {"bytes": 0}
    real_pieces = faults._pieces

    def counting_pieces(n: int, chunked: bool):   # what the upstream has written for /bytes/<big>
        for piece in real_pieces(n, chunked):
            if n == big:
                pumped["bytes"] += len(piece)
            yield piece

    monkeypatch.setattr(faults, "_pieces", counting_pieces)
    up = await upstream("ok")
    gw = await gateway([up])
    loop = asyncio.get_running_loop()
    client = await Raw.open(gw.port, rcvbuf=SMALL_RCVBUF)
    try:
        await eventually(lambda: len(gw.proxy.connections) == 1, "the proxy accepted the client")
        shrink_sndbuf(proxy_client(gw).transport)   # the first 100 KB must not fit in the kernel
        await client.send(b"GET /bytes/100000 HTTP/1.1\r\nHost: t\r\n\r\n"
                          b"GET /bytes/%d HTTP/1.1\r\nHost: t\r\n\r\n" % big)
        await up.wait_requests(1)

        # Observation window (pacing, not synchronisation): the client reads nothing.
        peak_buffered = 0
        until = loop.time() + 0.8
        for _ in range(200):   # bounded; `until` normally ends it
            buffered = sum(c.transport.get_write_buffer_size() for c in gw.proxy.connections)
            peak_buffered = max(peak_buffered, buffered)
            assert buffered < 4 * MiB, (
                f"proxy holds {buffered / MiB:.1f} MiB for a client that reads nothing; the upstream "
                f"has pushed {pumped['bytes'] / MiB:.1f} MiB of the second response")
            assert pumped["bytes"] < 32 * MiB, (
                f"the second exchange's upstream streamed {pumped['bytes'] / MiB:.1f} MiB "
                "to a client that reads nothing")
            if loop.time() >= until:
                break
            await asyncio.sleep(0.02)

        # Once the client reads, the pipeline moves on: all of the first response, then the
        # second one's head.
        first, second = await replies(client, ("GET", "GET"), last_head_only=True)
        assert first[0] == 200 and len(first[2]) == 100_000, first[:2]
        assert second[0] == 200 and second[1].get("content-length") == str(big), second[:2]
    finally:
        client.close()


# -- 2. a read pause that outlived its exchange ------------------------------------------------
async def test_early_answer_with_unsent_body_does_not_stall_the_client(scripted, gateway, parser,
                                                                       monkeypatch):
    """Regression (PEER_FULL stale pause): the upstream answered a ~100 KB POST before reading
    its body and kept the connection alive. The exchange ended while the proxy still held
    unsent body bytes, the client's read gate stayed paused (PEER_FULL) for good, and the
    upstream connection went back to the pool with those bytes queued: the next keep-alive
    request on the same client connection was never read."""
    real_made = upstream_conn.UpstreamConnection.connection_made

    def connection_made(self, transport):
        shrink_sndbuf(transport)   # the body must not fit in the kernel towards the upstream
        real_made(self, transport)

    monkeypatch.setattr(upstream_conn.UpstreamConnection, "connection_made", connection_made)

    body_may_be_read = asyncio.Event()
    seen: list[tuple[int, bytes]] = []

    async def handler(sock: socket.socket, index: int) -> None:
        buf = b""
        while True:
            head, buf = await up.read_head(sock, buf)
            if head is None:
                return
            seen.append((index, head.split(b" ", 2)[1]))
            answer = b"early" if head.startswith(b"POST") else b"next"
            # RFC 9112 §9.3 allows an answer before the body has been read; keep-alive.
            await up.loop.sock_sendall(sock, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b"
                                       % (len(answer), answer))
            n = content_length(head)
            if n:
                await body_may_be_read.wait()
                buf = await up.read_body(sock, buf, n)
                if buf is None:
                    return

    up = await scripted(handler, rcvbuf=SMALL_RCVBUF)
    gw = await gateway([up.url], timeouts={"client_idle": 10.0})
    client = await Client.open(gw.port)
    try:
        first = await client.request("POST", "/upload", body=b"x" * 100_000, timeout=5)
        assert first.status == 200 and first.body == b"early", first
        # The answer has reached the client, so the proxy is done with that exchange; now
        # the upstream catches up on the body, as a keep-alive server does.
        body_may_be_read.set()
        try:
            second = await client.request("GET", "/next", timeout=3)
        except TimeoutError:
            pytest.fail("the second request on the keep-alive connection got no answer within 3 s "
                        "(the client's read pause outlived the exchange that caused it)")
        assert second.status == 200 and second.body == b"next", second
        assert [path for _, path in seen] == [b"/upload", b"/next"]
    finally:
        client.close()


# -- 3. the request-head deadline survives resume_writing --------------------------------------
async def _slow_reader(upstream, gateway, client_header: float):
    """A gateway (client_idle 10 s) and a client whose reads it fills at once (small
    buffers on both sides): (gw, client, the proxy's side of it)."""
    up = await upstream("ok")
    gw = await gateway([up], timeouts={"client_header": client_header, "client_idle": 10.0})
    client = await Raw.open(gw.port, rcvbuf=SMALL_RCVBUF)
    try:
        await eventually(lambda: len(gw.proxy.connections) == 1, "the proxy accepted the client")
        conn = proxy_client(gw)
        shrink_sndbuf(conn.transport)
    except BaseException:
        client.close()
        raise
    return gw, client, conn


async def test_partial_head_after_paused_response_still_times_out(upstream, gateway, parser):
    """Regression (slowloris): a response ended while the client's write side was paused;
    the client then sent part of a new request head and drained the response.
    resume_writing re-armed the timer for state HEAD as "no deadline", so the partial head
    held the connection open forever instead of getting 408 after client_header."""
    client_header = 0.5
    gw, client, conn = await _slow_reader(upstream, gateway, client_header)
    loop = asyncio.get_running_loop()
    try:
        await client.send(b"GET /bytes/100000 HTTP/1.1\r\nHost: t\r\n\r\n")
        await eventually(lambda: conn.state == "idle" and conn._write_paused,
                         "the response ended at the proxy while the client was not reading")
        started = loop.time()
        await client.send(b"GET / HTTP/1.1\r\nHo")   # a head that never ends
        await eventually(lambda: conn.state == "head", "the proxy saw the partial head")
        (first,) = await replies(client, ("GET",))   # drain: resume_writing
        assert first[0] == 200 and len(first[2]) == 100_000, first[:2]
        assert loop.time() - started < client_header, "draining took longer than client_header"
        raw, closed = await client.recv_until_close(client_header + 2.0)
    finally:
        client.close()
    assert closed, f"a partial head held the connection {loop.time() - started:.1f} s (client_header 0.5 s)"
    assert loop.time() - started <= client_header + 1.5
    if raw:  # (a 408 first is allowed, RFC 9110 §15.5.9)
        (reply,) = parse_replies(raw)
        assert_rejected(reply, 408, gw)


async def test_half_a_pipelined_head_waits_for_a_client_that_does_not_read(upstream, gateway, parser):
    """Regression: half a pipelined head, sent with a request whose large response the
    client did not read, started its client_header deadline when that response was handed
    to the transport; at client_header the stalled client was aborted, its response cut
    short. While the client is not reading, client_idle is its allowance; the head's
    client_header starts once the response is out (as nginx)."""
    client_header = 0.5
    gw, client, conn = await _slow_reader(upstream, gateway, client_header)
    loop = asyncio.get_running_loop()
    try:
        await client.send(b"GET /bytes/100000 HTTP/1.1\r\nHost: t\r\n\r\nGET / HTTP/1.1\r\nHo")
        await eventually(lambda: conn.current is None and conn._write_paused and conn.state == "head",
                         "the response ended at the proxy, unread, with half a head held")
        stalled = loop.time()
        await eventually(lambda: loop.time() - stalled > client_header + 0.5 or conn not in gw.proxy.connections,
                         "client_header and a margin passed, or the proxy dropped the client")
        assert conn in gw.proxy.connections, "a client not reading was cut off at client_header"
        (first,) = await replies(client, ("GET",))   # drain: resume_writing
        drained = loop.time()
        assert first[0] == 200 and len(first[2]) == 100_000, first[:2]
        raw, closed = await client.recv_until_close(client_header + 2.0)
    finally:
        client.close()
    assert closed, f"half a head held the connection {loop.time() - drained:.1f} s after the drain"
    assert client_header * 0.9 <= loop.time() - drained <= client_header + 1.5
    (reply,) = parse_replies(raw)
    assert_rejected(reply, 408, gw)


# -- 4. h11: a 1xx head and the final head in one read ------------------------------------------
EARLY_HINTS_BODY = bytes(range(256)) * 2400   # 614 400 bytes: more than two 256 KiB reads


async def test_interim_and_final_head_in_one_read(scripted, gateway, parser):
    """Regression (h11 codec): when a 103 Early Hints head and the final 200 head arrived in
    the same read, the adapter re-armed its head check after the 1xx and then fed the
    body bytes of later reads to it as if they were a head, cutting the response after
    max_response_header_bytes (502 http_response_incomplete, client aborted)."""
    body = EARLY_HINTS_BODY

    async def handler(sock: socket.socket, index: int) -> None:
        buf = b""
        while True:
            head, buf = await up.read_head(sock, buf)
            if head is None:
                return
            await up.loop.sock_sendall(
                sock, b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
                      b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)

    up = await scripted(handler)
    gw = await gateway([up.url])
    reply = await http(gw.port, "GET", "/", timeout=5)
    assert reply.status == 200, reply.headers
    assert len(reply.body) == len(body) and reply.body == body
    assert not gw.proxy.recorder.recent(), gw.proxy.recorder.recent()


# -- 5. response transfer codings other than chunked ------------------------------------------
async def _gzip_chunked_upstream(scripted):
    gz = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03\xcbH\xcd\xc9\xc9\x07\x00\x86\xa6\x106\x05\x00\x00\x00"

    async def handler(sock: socket.socket, index: int) -> None:
        buf = b""
        while True:
            head, buf = await up.read_head(sock, buf)
            if head is None:
                return
            await up.loop.sock_sendall(sock, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
                                             b"%x\r\n%b\r\n0\r\n\r\n" % (len(gz), gz))

    up = await scripted(handler)
    return up, gz


async def test_response_transfer_coding_is_not_relayed(scripted, gateway, parser):
    """Regression (llhttp codec): an upstream response with `Transfer-Encoding: gzip, chunked`
    was re-framed as plain chunked and relayed as 200: the gzip coding label was dropped
    and the client got compressed bytes it had no way to know it must decode (RFC 9112
    §6.1). It must be a 502 from gatewise instead."""
    up, gz = await _gzip_chunked_upstream(scripted)
    gw = await gateway([up.url])
    reply = await http(gw.port, "GET", "/", timeout=5)
    assert reply.status == 502, (reply.status, reply.headers, reply.body[:60])
    assert reply.our_status().get("error"), reply.headers
    assert gz not in reply.body
    entry = gw.proxy.recorder.get(reply.header("x-request-id"))
    assert entry is not None and entry["status"] == 502, entry


@pytest.mark.parametrize("parser", ["llhttp", "h11"])
async def test_response_transfer_coding_error_token(scripted, gateway, parser):
    """Regression: a response transfer coding other than plain chunked must be reported as
    Proxy-Status error=http_response_transfer_coding; llhttp said http_response_incomplete
    (head_seen was set before the exchange refused the head) and h11 http_protocol_error
    (h11 refused the coding before gatewise could name it)."""
    up, _ = await _gzip_chunked_upstream(scripted)
    gw = await gateway([up.url])
    reply = await http(gw.port, "GET", "/", timeout=5)
    assert reply.status == 502
    assert reply.our_status().get("error") == "http_response_transfer_coding", reply.headers


# -- 6. one failure, one record ----------------------------------------------------------------
async def test_client_too_slow_is_recorded_once(upstream, gateway, parser):
    """Regression: a client that read nothing of a big response was recorded twice: first
    as client_idle expiring (408 http_request_error), then, when the abort cancelled the
    forward task, as client_disconnected, which replaced the first entry under the same
    request id and counted a second failure in failures_by_error."""
    up = await upstream("ok")
    gw = await gateway([up], timeouts={"client_idle": 0.3})
    client = await Raw.open(gw.port, rcvbuf=SMALL_RCVBUF)
    try:
        await client.send(b"GET /bytes/100000000 HTTP/1.1\r\nHost: t\r\n\r\n")
        await eventually(lambda: b"\r\n\r\n" in client.peek(), "the response head arrived")
        head = client.peek().split(b"\r\n\r\n", 1)[0].decode("latin-1")
        m = re.search(r"(?im)^x-request-id:\s*(\S+)", head)
        assert m, head
        request_id = m.group(1)
        # Nothing is read. connection_lost (which empties gw.proxy.connections) is where a
        # forward() task gets cancelled; once no task is still being cancelled, nothing is
        # left that could record anything more.
        await eventually(lambda: not gw.proxy.connections, "the slow client was dropped")
        await eventually(lambda: not any(t.cancelling() for t in forward_tasks()),
                         "the cancelled forward() task finished")
    finally:
        client.close()
    recorder = gw.proxy.recorder
    assert sum(recorder.failures_by_error.values()) == 1, recorder.failures_by_error
    entries = [e for e in recorder.recent() if e["request_id"] == request_id]
    assert len(entries) == 1 and len(recorder.recent()) == 1, recorder.recent()
    assert entries[0]["error"] == "http_request_error" and entries[0]["status"] == 408, entries[0]
    assert "client_idle" in entries[0]["details"], entries[0]


async def test_client_too_slow_leaves_nothing_behind(upstream, gateway, parser):
    """After a client is dropped for reading nothing (client_idle), its forward() task and
    upstream connection go too: a slow client costs nothing once it is gone.

    Regression: 03727e9 marked the exchange finished before abort(), so connection_lost
    stopped cancelling its forward() task and the paused upstream connection lived on."""
    up = await upstream("ok")
    gw = await gateway([up], timeouts={"client_idle": 0.3})
    client = await Raw.open(gw.port, rcvbuf=SMALL_RCVBUF)
    try:
        await client.send(b"GET /bytes/100000000 HTTP/1.1\r\nHost: t\r\n\r\n")
        await up.wait_requests(1)
        await eventually(lambda: not gw.proxy.connections, "the slow client was dropped")
    finally:
        client.close()
    await eventually(lambda: not forward_tasks(), "no forward() task left", timeout=2.0)
    await eventually(lambda: not up._conns, "the upstream connection closed", timeout=2.0)


# -- 7. stray bytes after a complete response --------------------------------------------------
async def test_stray_bytes_after_response_do_not_poison_the_pool(scripted, gateway, parser):
    """Regression (llhttp codec): bytes after a complete response in the same read (the start
    of a message nobody asked for) left llhttp mid-message, yet the connection was pooled;
    the next request on it failed with http_protocol_error ("Invalid header token") and
    was blamed on the upstream."""

    async def handler(sock: socket.socket, index: int) -> None:
        buf, n = b"", 0
        while True:
            head, buf = await up.read_head(sock, buf)
            if head is None:
                return
            n += 1
            body = b"conn%d-req%d" % (index, n)
            out = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
            if index == 0 and n == 1:   # one send, so one read at the proxy
                out += b"HTTP/1.1 204 No Content\r\nX-Stray: 1\r\n"
            await up.loop.sock_sendall(sock, out)

    up = await scripted(handler)
    gw = await gateway([up.url])
    client = await Client.open(gw.port)
    try:
        first = await client.request("GET", "/1", timeout=5)
        assert (first.status, first.body) == (200, b"conn0-req1"), first
        second = await client.request("GET", "/2", timeout=5)
    finally:
        client.close()
    assert second.status == 200, (second.status, second.header("proxy-status"))
    assert second.body == b"conn1-req1", "the second request should go on a fresh upstream connection"
    assert gw.proxy.pools["app"].servers[0].failures_total == 0
    assert not gw.proxy.recorder.recent(), gw.proxy.recorder.recent()
