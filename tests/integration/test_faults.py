"""The fault-injecting upstream (diagnostics/faults.py) over real loopback sockets.

Each mode is checked from the outside with a raw asyncio client; well-formed answers are
parsed with h11 (the strict reference codec), so a framing mistake in the fault server
fails here rather than as a confusing proxy test. No sleeps for synchronisation: every
wait is an event or a deadline.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import h11
import orjson
import pytest

from diagnostics.faults import GARBAGE, PARTIAL_LENGTH, PARTIAL_SENT, TLS_ALERT, FaultServer, parse_mode
from tests.tlsutil import client_context, pki, server_context  # noqa: F401 (pki: fixture)

REPO = Path(__file__).resolve().parents[2]
GET = b"GET / HTTP/1.1\r\nHost: up\r\n\r\n"


pytestmark = pytest.mark.both_loops  # every fault on uvloop and on plain asyncio


class Client:
    """One keep-alive connection; requests and responses framed by h11."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer, self.h11 = reader, writer, h11.Connection(h11.CLIENT)

    @classmethod
    async def open(cls, server: FaultServer, tls: ssl.SSLContext | None = None) -> Client:
        """tls: a client context; the TLS server name is "localhost"."""
        return cls(*await asyncio.wait_for(asyncio.open_connection(
            "127.0.0.1", server.port, ssl=tls, server_hostname="localhost" if tls else None), 2))

    async def request(self, method: str, target: str, headers: list[tuple[str, str]] | None = None,
                      body: bytes = b"", chunked: bool = False, timeout: float = 5.0):
        """Returns (response, body, trailers)."""
        hdrs = [("Host", "up"), *(headers or [])]
        if chunked:
            hdrs.append(("Transfer-Encoding", "chunked"))
        elif body:
            hdrs.append(("Content-Length", str(len(body))))
        if self.h11.our_state is h11.DONE:
            self.h11.start_next_cycle()
        out = self.h11.send(h11.Request(method=method, target=target, headers=hdrs))
        if body:
            out += self.h11.send(h11.Data(data=body))
        out += self.h11.send(h11.EndOfMessage())
        self.writer.write(out)
        response, data = None, bytearray()
        async with asyncio.timeout(timeout):
            while True:
                event = self.h11.next_event()
                if event is h11.NEED_DATA:
                    self.h11.receive_data(await self.reader.read(256 * 1024))
                elif isinstance(event, h11.Response):
                    response = event
                elif isinstance(event, h11.Data):
                    data += event.data
                elif isinstance(event, h11.EndOfMessage):
                    return response, bytes(data), dict(event.headers)
                elif isinstance(event, h11.ConnectionClosed):
                    raise AssertionError("connection closed before the response ended")

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass


def header(response: h11.Response, name: str) -> str | None:
    for k, v in response.headers:
        if k == name.lower().encode():
            return v.decode()
    return None


async def raw_exchange(server: FaultServer, request: bytes = GET, timeout: float = 3.0,
                       tls: ssl.SSLContext | None = None) -> bytes:
    """Send raw bytes, read until EOF (bounded by `timeout`); tls: over TLS to "localhost"."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(
        "127.0.0.1", server.port, ssl=tls, server_hostname="localhost" if tls else None), 2)
    try:
        writer.write(request)
        async with asyncio.timeout(timeout):
            return await reader.read(-1)
    finally:
        writer.close()


# -- parse_mode

@pytest.mark.parametrize("text, expected", [
    ("ok", ("ok", None)), ("slow:0.5", ("slow", 0.5)), ("status:503", ("status", 503)),
    ("flaky:0.3", ("flaky", 0.3)), ("huge-header", ("huge-header", None)), ("blackhole", ("blackhole", None)),
])
def test_parse_mode_accepts(text, expected):
    assert parse_mode(text) == expected


@pytest.mark.parametrize("text, words", [
    ("explode", "unknown fault mode"), ("slow", "needs a number"), ("slow:fast", "needs a number"),
    ("slow:-1", ">= 0"), ("status:99", "200-599"), ("status:5x", "needs a number"),
    ("flaky:1.5", "0.0-1.0"), ("hang:3", "takes no argument"),
])
def test_parse_mode_rejects_with_a_clear_message(text, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        parse_mode(text)


# -- ok

async def test_ok_routes_and_x_upstream():
    async with FaultServer(name="alpha") as up:
        assert up.url == f"http://127.0.0.1:{up.port}" and up.address == f"127.0.0.1:{up.port}"
        c = await Client.open(up)
        resp, body, _ = await c.request("GET", "/health")
        assert (resp.status_code, body, header(resp, "x-upstream")) == (200, b"ok\n", "alpha")
        resp, body, _ = await c.request("GET", "/anything/else?q=1")
        assert (resp.status_code, body, header(resp, "content-length")) == (200, b"hello\n", "6")
        await c.close()
    async with FaultServer() as up:   # unnamed: the address identifies it
        c = await Client.open(up)
        resp, _, _ = await c.request("GET", "/")
        assert header(resp, "x-upstream") == up.address
        await c.close()


async def test_echo_reports_headers_in_order_and_body_hash():
    body = bytes(range(256)) * 1000
    async with FaultServer() as up:
        c = await Client.open(up)
        resp, data, _ = await c.request("POST", "/echo?x=1", [("X-Mixed-Case", "A"), ("x-b", "2")], body)
        echo = orjson.loads(data)
        assert resp.status_code == 200
        assert echo["method"] == "POST" and echo["path"] == "/echo?x=1"
        assert echo["headers"][:3] == [["Host", "up"], ["X-Mixed-Case", "A"], ["x-b", "2"]]
        assert echo["body_bytes"] == len(body) and echo["body_sha256"] == hashlib.sha256(body).hexdigest()
        resp, data, _ = await c.request("PUT", "/echo", body=b"abc" * 1000, chunked=True)
        assert orjson.loads(data)["body_bytes"] == 3000
        assert up.last_request["method"] == "PUT" and up.last_request["body_bytes"] == 3000
        assert up.requests_seen == 2 and up.connections_accepted == 1
        await c.close()


@pytest.mark.parametrize("n", [0, 1, 65536, 3_000_001])
async def test_bytes_n_has_exact_length(n):
    async with FaultServer() as up:
        c = await Client.open(up)
        resp, body, _ = await c.request("GET", f"/bytes/{n}")
        assert header(resp, "content-length") == str(n) and len(body) == n
        await c.close()


async def test_chunked_n_has_trailer():
    async with FaultServer() as up:
        c = await Client.open(up)
        resp, body, trailers = await c.request("GET", "/chunked/200000")
        assert header(resp, "transfer-encoding") == "chunked" and header(resp, "content-length") is None
        assert len(body) == 200000 and trailers == {b"x-checksum": b"200000"}
        resp, body, trailers = await c.request("GET", "/chunked/0")   # same connection still usable
        assert body == b"" and trailers == {b"x-checksum": b"0"}
        await c.close()


async def test_head_gets_headers_without_body():
    async with FaultServer() as up:
        c = await Client.open(up)
        for target, framing in [("/bytes/1000", ("content-length", "1000")),
                                ("/chunked/5", ("transfer-encoding", "chunked")),
                                ("/", ("content-length", "6"))]:
            resp, body, _ = await c.request("HEAD", target)
            assert header(resp, framing[0]) == framing[1] and body == b""
        resp, body, _ = await c.request("GET", "/health")   # framing stayed in sync
        assert body == b"ok\n"
        await c.close()


async def test_keep_alive_and_pipelining_on_one_connection():
    async with FaultServer() as up:
        c = await Client.open(up)
        for _ in range(2):
            resp, body, _ = await c.request("GET", "/health")
            assert body == b"ok\n"
        await c.close()
        assert up.connections_accepted == 1 and up.requests_seen == 2
        # Pipelined: three requests in one write, three answers in order.
        pipelined = b"".join(b"GET /bytes/%d HTTP/1.1\r\nHost: up\r\n\r\n" % n for n in (3, 70000, 5))
        raw = await raw_exchange(up, pipelined + b"GET /close HTTP/1.1\r\nHost: up\r\n\r\n")
        assert raw.count(b"HTTP/1.1 200 OK") == 4 and raw.endswith(b"bye\n")
        assert len(raw) > 70000 + 8


async def test_close_route_is_close_delimited():
    async with FaultServer() as up:
        raw = await raw_exchange(up, b"GET /close HTTP/1.1\r\nHost: up\r\n\r\n")
        head, _, body = raw.partition(b"\r\n\r\n")
        assert b"content-length" not in head.lower() and b"connection: close" in head.lower()
        assert body == b"bye\n"


async def test_expect_100_continue_comes_before_the_body():
    async with FaultServer() as up:
        reader, writer = await asyncio.open_connection("127.0.0.1", up.port)
        writer.write(b"POST /echo HTTP/1.1\r\nHost: up\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"data")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
        assert head.startswith(b"HTTP/1.1 200 OK")
        length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
        assert orjson.loads(await reader.readexactly(length))["body_bytes"] == 4
        writer.close()


async def test_bad_request_gets_400_and_close():
    async with FaultServer() as up:
        raw = await raw_exchange(up, b"NOT HTTP AT ALL\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 400 ") and b"connection: close" in raw.lower()


async def test_huge_body_is_streamed_under_backpressure():
    """/bytes/500000000 must not be built in memory: the server pauses when we stop reading."""
    async with FaultServer() as up:
        reader, writer = await asyncio.open_connection("127.0.0.1", up.port, limit=64 * 1024)
        writer.write(b"GET /bytes/500000000 HTTP/1.1\r\nHost: up\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
        assert b"Content-Length: 500000000" in head
        (conn,) = up._conns
        deadline = time.monotonic() + 3
        while not conn.write_paused:   # we read nothing more: the socket buffers fill up
            assert time.monotonic() < deadline, "server never saw backpressure"
            await asyncio.sleep(0.01)
        assert conn.transport.get_write_buffer_size() <= 1024 * 1024
        got = len(await asyncio.wait_for(reader.readexactly(4_000_000), 5))   # and it resumes
        assert got == 4_000_000
        writer.close()


# -- connection-level faults

async def test_refuse_gives_connection_refused():
    async with FaultServer("refuse") as up:
        assert up.port > 0
        with pytest.raises(ConnectionRefusedError):
            await asyncio.wait_for(asyncio.open_connection("127.0.0.1", up.port), 2)


async def test_blackhole_connect_times_out():
    async with FaultServer("blackhole") as up:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        for _ in range(2):   # a second attempt hangs as well: nothing drains the queue
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(loop.create_connection(asyncio.Protocol, "127.0.0.1", up.port), 0.5)
        assert time.monotonic() - started < 2.5
        assert up.connections_accepted == 0
    with pytest.raises(ConnectionRefusedError):   # close() really released the port
        await asyncio.wait_for(asyncio.open_connection("127.0.0.1", up.port), 2)


async def test_hang_reads_the_request_and_never_answers():
    async with FaultServer("hang") as up:
        reader, writer = await asyncio.open_connection("127.0.0.1", up.port)
        writer.write(b"POST / HTTP/1.1\r\nHost: up\r\nContent-Length: 3\r\n\r\nabc")
        await up.wait_requests(1, timeout=2)
        assert up.last_request["body_bytes"] == 3
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(1), 0.3)
        writer.close()


async def test_slow_answers_after_the_delay():
    async with FaultServer("slow:0.3") as up:
        c = await Client.open(up)
        started = time.monotonic()
        resp, body, _ = await c.request("GET", "/health")
        assert time.monotonic() - started >= 0.29 and body == b"ok\n"
        await c.close()


async def test_reset_sends_rst_after_reading():
    async with FaultServer("reset") as up:
        with pytest.raises(ConnectionResetError):
            await raw_exchange(up)
        assert up.requests_seen == 1


async def test_close_sends_fin_without_answering():
    async with FaultServer("close") as up:
        assert await raw_exchange(up) == b""
        assert up.requests_seen == 1


@pytest.mark.parametrize("mode, expected", [("garbage", GARBAGE), ("tls", TLS_ALERT)])
async def test_non_http_answers(mode, expected):
    async with FaultServer(mode) as up:
        assert await raw_exchange(up) == expected


@pytest.mark.parametrize("mode", ["truncate", "stall"])
async def test_partial_body(mode):
    async with FaultServer(mode) as up:
        reader, writer = await asyncio.open_connection("127.0.0.1", up.port)
        writer.write(GET)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
        assert head.startswith(b"HTTP/1.1 200 OK") and b"Content-Length: %d" % PARTIAL_LENGTH in head
        assert len(await asyncio.wait_for(reader.readexactly(PARTIAL_SENT), 2)) == PARTIAL_SENT
        if mode == "truncate":
            assert await asyncio.wait_for(reader.read(-1), 2) == b""   # EOF, far short of the length
        else:
            with pytest.raises(TimeoutError):                           # silence, connection open
                await asyncio.wait_for(reader.read(1), 0.3)
        writer.close()


async def test_huge_header():
    async with FaultServer("huge-header") as up:
        reader, writer = await asyncio.open_connection("127.0.0.1", up.port, limit=1024 * 1024)
        writer.write(GET)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
        assert head.startswith(b"HTTP/1.1 200 OK") and 200 * 1024 <= len(head) <= 220 * 1024
        length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
        assert await asyncio.wait_for(reader.readexactly(length), 2) == b"huge header\n"
        writer.close()


async def test_status_code_with_keep_alive():
    async with FaultServer("status:503", name="s") as up:
        c = await Client.open(up)
        for _ in range(2):
            resp, body, _ = await c.request("GET", "/health")
            assert resp.status_code == 503 and body.startswith(b"503 Service Unavailable")
            assert header(resp, "x-upstream") == "s"
        assert up.connections_accepted == 1
        await c.close()
    async with FaultServer("status:204") as up:
        c = await Client.open(up)
        resp, body, _ = await c.request("GET", "/")
        assert resp.status_code == 204 and body == b"" and header(resp, "content-length") is None
        await c.close()


async def test_flaky_extremes():
    async with FaultServer("flaky:1.0", seed=1) as up:
        for _ in range(3):
            with pytest.raises(ConnectionResetError):
                await raw_exchange(up)
    async with FaultServer("flaky:0.0", seed=1) as up:
        c = await Client.open(up)
        for _ in range(5):
            resp, _, _ = await c.request("GET", "/")
            assert resp.status_code == 200
        await c.close()


async def test_flaky_is_reproducible_with_a_seed():
    async def outcomes() -> list[bool]:
        async with FaultServer("flaky:0.5", seed=7) as up:
            results = []
            for _ in range(12):
                try:
                    results.append((await raw_exchange(up, b"GET / HTTP/1.1\r\nHost: up\r\n"
                                                           b"Connection: close\r\n\r\n")).startswith(b"HTTP/1.1 200"))
                except ConnectionResetError:
                    results.append(False)
            return results
    first = await outcomes()
    assert first == await outcomes() and True in first and False in first


# -- connection management

async def test_close_after_closes_on_the_next_request():
    """The keep-alive race: request 2 on a reused connection gets FIN and no answer."""
    async with FaultServer(close_after=1) as up:
        reader, writer = await asyncio.open_connection("127.0.0.1", up.port)
        writer.write(GET)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
        assert head.startswith(b"HTTP/1.1 200 OK")
        assert await asyncio.wait_for(reader.readexactly(6), 2) == b"hello\n"
        writer.write(GET)
        assert await asyncio.wait_for(reader.read(-1), 2) == b""
        assert up.requests_seen == 2
        writer.close()


async def test_keepalive_timeout_closes_idle_connections_and_is_advertised():
    async with FaultServer(keepalive_timeout=0.2, advertise_keepalive=True) as up:
        c = await Client.open(up)
        resp, _, _ = await c.request("GET", "/")
        assert header(resp, "keep-alive") == "timeout=0.2"
        started = time.monotonic()
        assert await asyncio.wait_for(c.reader.read(-1), 2) == b""
        assert time.monotonic() - started >= 0.15
        await c.close()


async def test_read_rate_throttles_uploads():
    body = b"u" * 400_000
    async with FaultServer(read_rate=1_000_000) as up:
        c = await Client.open(up)
        started = time.monotonic()
        resp, data, _ = await c.request("POST", "/echo", body=body)
        assert time.monotonic() - started >= 0.35
        assert orjson.loads(data)["body_bytes"] == len(body)
        await c.close()


async def test_close_aborts_live_connections_and_leaves_no_tasks():
    up = await FaultServer("hang").start()
    reader, writer = await asyncio.open_connection("127.0.0.1", up.port)
    writer.write(GET)
    await up.wait_requests(1, timeout=2)
    await up.close()
    await up.close()   # idempotent
    try:
        assert await asyncio.wait_for(reader.read(-1), 2) == b""
    except ConnectionResetError:
        pass   # abort() may reset: either way the connection is gone
    assert up._conns == set()
    assert asyncio.all_tasks() == {asyncio.current_task()}
    writer.close()


# -- CLI

async def test_cli_serves_until_sigterm():
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "faults", "--listen", "127.0.0.1:0", "--mode", "ok",
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode()
        match = re.fullmatch(r"gatewise faults: mode=ok listening on 127\.0\.0\.1:(\d+)\n", line)
        assert match, line
        reader, writer = await asyncio.open_connection("127.0.0.1", int(match.group(1)))
        writer.write(b"GET /health HTTP/1.1\r\nHost: up\r\nConnection: close\r\n\r\n")
        raw = await asyncio.wait_for(reader.read(-1), 3)
        assert raw.startswith(b"HTTP/1.1 200 OK") and raw.endswith(b"\r\n\r\nok\n")
        writer.close()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 5) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_cli_rejects_a_bad_mode():
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "faults", "--listen", "127.0.0.1:0", "--mode", "explode",
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 2 and out == b"" and b"unknown fault mode 'explode'" in err


def test_faults_module_does_not_import_proxy():
    """diagnostics never imports proxy (STYLE.md section 2)."""
    code = "import sys, diagnostics.faults; print(sorted(m for m in sys.modules if m.split('.')[0] == 'proxy'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


# -- TLS serving (ssl=): every mode over TLS, and the alerts a real TLS server sends

async def test_tls_serves_ok_with_keep_alive_and_an_https_url(pki):
    async with FaultServer(ssl=server_context(pki.good)) as up:
        assert up.url == f"https://127.0.0.1:{up.port}"
        c = await Client.open(up, client_context(pki.ca))
        for _ in range(2):
            resp, body, _ = await c.request("GET", "/health")
            assert resp.status_code == 200 and body == b"ok\n"
        resp, body, _ = await c.request("POST", "/echo", body=b"x" * 100_000)
        echo = orjson.loads(body)
        assert echo["body_bytes"] == 100_000 and echo["body_sha256"] == hashlib.sha256(b"x" * 100_000).hexdigest()
        cert = c.writer.get_extra_info("peercert")
        assert ("DNS", "localhost") in cert["subjectAltName"]
        await c.close()
        assert up.connections_accepted == 1 and up.requests_seen == 3 and up.tls_handshake_failures == 0


async def test_tls_streams_big_bodies_exactly(pki):
    """/bytes and /chunked over TLS: the pump and its backpressure work through the TLS layer."""
    async with FaultServer(ssl=server_context(pki.good)) as up:
        c = await Client.open(up, client_context(pki.ca))
        resp, body, _ = await c.request("GET", "/bytes/3000000")
        assert header(resp, "content-length") == "3000000" and len(body) == 3_000_000
        resp, body, trailers = await c.request("GET", "/chunked/300000")
        assert len(body) == 300_000 and trailers[b"x-checksum"] == b"300000"
        await c.close()


@pytest.mark.parametrize("mode", ["status:503", "slow:0.2"])
async def test_tls_answering_modes(pki, mode):
    async with FaultServer(mode, ssl=server_context(pki.good)) as up:
        c = await Client.open(up, client_context(pki.ca))
        started = time.monotonic()
        resp, _, _ = await c.request("GET", "/")
        assert resp.status_code == (503 if mode.startswith("status") else 200)
        if mode.startswith("slow"):
            assert time.monotonic() - started >= 0.18
        await c.close()


@pytest.mark.parametrize("mode, expected", [("garbage", GARBAGE), ("close", b"")])
async def test_tls_non_answers_are_sent_inside_tls(pki, mode, expected):
    """garbage: the bytes come through TLS; close: close_notify then FIN (a clean EOF)."""
    async with FaultServer(mode, ssl=server_context(pki.good)) as up:
        assert await raw_exchange(up, tls=client_context(pki.ca)) == expected
        assert up.requests_seen == 1


async def test_tls_reset_resets(pki):
    async with FaultServer("reset", ssl=server_context(pki.good)) as up:
        with pytest.raises(ConnectionResetError):
            await raw_exchange(up, tls=client_context(pki.ca))
        assert up.requests_seen == 1


async def test_tls_hang_reads_and_never_answers_and_close_aborts(pki):
    up = await FaultServer("hang", ssl=server_context(pki.good)).start()
    reader, writer = await asyncio.open_connection("127.0.0.1", up.port, ssl=client_context(pki.ca),
                                                   server_hostname="localhost")
    writer.write(GET)
    await up.wait_requests(1, timeout=2)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.read(1), 0.2)
    # a second client that never starts its handshake is aborted by close() as well
    _, idle_writer = await asyncio.open_connection("127.0.0.1", up.port)
    async with asyncio.timeout(2):
        while len(up._conns) < 2:
            await asyncio.sleep(0.01)
    await up.close()
    assert up._conns == set()
    try:
        assert await asyncio.wait_for(reader.read(-1), 2) == b""
    except (ConnectionResetError, ssl.SSLError):
        pass   # abort() may reset: either way the connection is gone
    writer.close()
    idle_writer.close()


async def test_tls_client_certificate_required_sends_alert_116(pki):
    """TLS 1.3: the client's handshake completes first; the server's alert 116
    (certificate_required) arrives on the client's first read."""
    ctx = server_context(pki.good, require_client_cert=True, ca=pki.ca)
    async with FaultServer(ssl=ctx) as up:
        reader, writer = await asyncio.open_connection("127.0.0.1", up.port, ssl=client_context(pki.ca),
                                                       server_hostname="localhost")
        writer.write(GET)
        with pytest.raises(ssl.SSLError) as err:
            await asyncio.wait_for(reader.read(-1), 2)
        assert err.value.reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED"
        writer.close()
        assert up.connections_accepted == 0 and up.requests_seen == 0
        assert up.tls_handshake_failures == 1 and up.last_tls_error == "PEER_DID_NOT_RETURN_A_CERTIFICATE"


async def test_tls_version_mismatch_sends_alert_70(pki):
    ctx = server_context(pki.good, minimum_version=ssl.TLSVersion.TLSv1_3)
    client = client_context(pki.ca)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    async with FaultServer(ssl=ctx) as up:
        with pytest.raises(ssl.SSLError) as err:
            await asyncio.wait_for(asyncio.open_connection("127.0.0.1", up.port, ssl=client,
                                                           server_hostname="localhost"), 2)
        assert err.value.reason == "TLSV1_ALERT_PROTOCOL_VERSION"
        assert up.tls_handshake_failures == 1 and up.last_tls_error == "UNSUPPORTED_PROTOCOL"


async def test_tls_server_gives_plaintext_clients_no_http(pki):
    """Plain HTTP to a TLS port: the handshake fails; no HTTP answer, connection closed."""
    async with FaultServer(ssl=server_context(pki.good)) as up:
        raw = await raw_exchange(up)
        assert not raw.startswith(b"HTTP/")
        async with asyncio.timeout(2):
            while up.tls_handshake_failures < 1:
                await asyncio.sleep(0.01)
        assert up.connections_accepted == 0 and up.requests_seen == 0


async def test_tls_client_rejecting_the_certificate_is_a_failed_handshake(pki):
    async with FaultServer(ssl=server_context(pki.self_signed)) as up:
        with pytest.raises(ssl.SSLCertVerificationError, match="self-signed"):
            await asyncio.wait_for(asyncio.open_connection("127.0.0.1", up.port, ssl=client_context(pki.ca),
                                                           server_hostname="localhost"), 2)
        async with asyncio.timeout(2):
            while up.tls_handshake_failures < 1:
                await asyncio.sleep(0.01)
        assert up.connections_accepted == 0


async def test_tls_modes_without_a_listener_still_say_https(pki):
    async with FaultServer("refuse", ssl=server_context(pki.good)) as up:
        assert up.url == f"https://127.0.0.1:{up.port}"
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", up.port)


def test_tls_mode_with_ssl_is_rejected(pki):
    with pytest.raises(ValueError, match="already speaks TLS"):
        FaultServer("tls", ssl=server_context(pki.good))

