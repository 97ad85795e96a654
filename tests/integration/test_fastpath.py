"""The fast path (proxy/forward.py): a request that can go out on an idle pooled
connection is sent from the client's callback and finished from the upstream's, with no
forward() task. These tests pin that it follows the same rules as the task path: the
bookkeeping of a success, the retry and RFC 9209 cause of a failure (handed over to the
task), and a client that goes away (recorded once, nothing left behind), including in
the windows only the fast path has: before a handed-over task first runs, and before the
request's deferred write (held in flow.Outbox while other requests are in flight, or on
a connection idle for forward.RACE_IDLE; written at once otherwise).

Most tests first send one request to fill the pool (that one connects, so its attempt
is handed to a task), then the request under test on the same client connection. The two
"same iteration" tests call the protocol's callbacks directly, as uvloop would when the
request and the close are read in one loop iteration.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from proxy import forward
from tests.conftest import Client
from tests.integration.test_regressions import Scripted, scripted  # noqa: F401  (scripted: a fixture)
from tests.rawclient import Raw, eventually, forward_tasks

GET = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nhello\n"


async def read_until(raw: Raw, marker: bytes, timeout: float = 5.0) -> bytes:
    data = b""
    async with asyncio.timeout(timeout):
        while marker not in data:
            piece = await raw.loop.sock_recv(raw.sock, 65536)
            assert piece, f"closed after {data[:200]!r}"
            data += piece
    return data


def current_exchange(gw):
    (conn,) = gw.proxy.connections
    return conn.current


@contextlib.contextmanager
def another_in_flight(pool):
    """Stands in for a second request in flight in `pool`: the fast path defers its write
    (and a finished response its flush) to the Outbox only then (forward.start,
    DownstreamProtocol.exchange_done); alone, it writes at once."""
    pool.in_flight += 1
    try:
        yield
    finally:
        pool.in_flight -= 1


def the_server(gw):
    """The pool "app" of a one-server gateway, and its server."""
    pool = gw.proxy.pools["app"]
    (server,) = pool.servers
    return pool, server


async def ok_then_garbage(server: Scripted, sock) -> None:
    """A scripted upstream connection: the first request gets OK, a second one bytes that
    are not HTTP; then it waits until the proxy closes it."""
    head, rest = await server.read_head(sock, b"")
    await server.loop.sock_sendall(sock, OK)
    head, rest = await server.read_head(sock, rest)
    if head is not None:
        await server.loop.sock_sendall(sock, b"\x00\x01garbage that is not HTTP\r\n\r\n")
        await server.read_head(sock, rest)


async def one_pooled(gw, client: Raw):
    """After one request on `client`: its protocol in the proxy, and the upstream
    connection now idle in the pool of the_server(gw)."""
    await client.send(GET)
    await read_until(client, b"hello\n")
    pool, server = the_server(gw)
    (proto,) = gw.proxy.connections
    (conn, _), = pool.idle[server]._idle
    return proto, conn


@pytest.fixture
async def handed_over():
    """The failures the fast path handed to a task (Attempt.on_failed names the task it
    creates after the failure): proof that a failure happened on the fast path, where the
    outcome alone would look the same from the task path. Call it for the list."""
    loop = asyncio.get_running_loop()
    previous = loop.get_task_factory()
    tasks: list[asyncio.Task] = []

    def factory(loop, coro, **kwargs):
        task = asyncio.Task(coro, loop=loop, **kwargs)
        tasks.append(task)
        return task

    loop.set_task_factory(factory)
    yield lambda: [t.get_name()[len(forward.HANDED_OVER):] for t in tasks
                   if t.get_name().startswith(forward.HANDED_OVER)]
    loop.set_task_factory(previous)


async def test_pooled_request_runs_without_a_task_and_is_counted_once(upstream, gateway):
    up = await upstream("slow:0.3")
    gw = await gateway([up])
    pool, server = the_server(gw)
    client = await Client.open(gw.port)
    try:
        assert (await client.request()).status == 200
        assert len(pool.idle[server]) == 1
        pending = asyncio.ensure_future(client.request())
        await eventually(lambda: up.requests_seen == 2, "the second request reached the upstream")
        ex = current_exchange(gw)
        assert ex.fast is not None and ex.task is None
        assert forward_tasks() == []
        assert pool.in_flight == 1 and server.active_requests == 1
        assert (await pending).status == 200
    finally:
        client.close()
    assert up.connections_accepted == 1  # the second request reused the pooled connection
    assert pool.in_flight == 0 and server.active_requests == 0
    assert server.requests_total == 2 and server.responses_by_class[2] == 2
    assert server.upstream_latency.count == 2 and pool.request_latency.count == 2
    assert gw.proxy.recorder.recent() == []


async def test_failure_on_a_pooled_connection_is_retried_on_another_server(scripted, gateway,  # noqa: F811
                                                                          handed_over):
    """The pooled connection to A answers its second request with garbage: the fast
    path hands the failure to the task, which retries the GET on B (an AwaitingHead
    failure of an idempotent request) and notes A's attempt."""

    async def b(sock, index):
        rest = b""
        while True:
            head, rest = await good.read_head(sock, rest)
            if head is None:
                return
            await good.loop.sock_sendall(sock, OK)

    bad = await scripted(lambda sock, index: ok_then_garbage(bad, sock))
    good = await scripted(b)
    gw = await gateway([bad.url, good.url], pool={"retries": 1})
    pool = gw.proxy.pools["app"]
    server_a, server_b = pool.servers
    client = await Client.open(gw.port)
    try:
        # Round robin: A (connects), B (connects), then A again on its pooled connection.
        for _ in range(2):
            assert (await client.request()).status == 200
        assert len(pool.idle[server_a]) == 1
        reply = await client.request()
    finally:
        client.close()
    assert reply.status == 200 and reply.body == b"hello\n"
    assert gw.proxy.recorder.retries_total == 1
    assert server_a.failures_by_cause == {"http_protocol_error": 1}
    assert bad.accepted == 1 and good.accepted == 1  # B's answer came on its pooled connection
    assert pool.in_flight == 0 and server_a.active_requests == 0 and server_b.active_requests == 0
    await eventually(lambda: not forward_tasks(), "the retry's task finished")
    assert handed_over() == ["UpstreamProtocolError"]  # A's failure was met on the fast path


async def test_failure_on_a_pooled_connection_reports_its_cause(scripted, gateway, handed_over):  # noqa: F811
    """No retry left: the client gets the 502 the task path would give, with the RFC 9209
    cause of the fast path's attempt and that attempt recorded."""
    up = await scripted(lambda sock, index: ok_then_garbage(up, sock))
    gw = await gateway([up.url], pool={"retries": 0})
    pool = gw.proxy.pools["app"]
    client = await Client.open(gw.port)
    try:
        assert (await client.request()).status == 200
        reply = await client.request()
    finally:
        client.close()
    assert reply.status == 502
    assert reply.our_status()["error"] == "http_protocol_error", reply.headers
    (entry,) = gw.proxy.recorder.recent()
    assert entry["error"] == "http_protocol_error" and len(entry["attempts"]) == 1
    assert pool.in_flight == 0 and pool.servers[0].active_requests == 0
    assert pool.request_latency.count == 2
    assert handed_over() == ["UpstreamProtocolError"]


async def test_keepalive_race_on_the_fast_path_retries_on_a_fresh_connection(upstream, gateway, handed_over):
    """close_after=1: the pooled connection is closed unanswered when the second request
    arrives on it; the retry (counted as a keep-alive race, not against `retries`) goes
    out on a fresh connection and the client never sees the race."""
    up = await upstream("ok", close_after=1)
    gw = await gateway([up], pool={"retries": 0})
    client = await Client.open(gw.port)
    try:
        for _ in range(2):
            assert (await client.request()).status == 200
    finally:
        client.close()
    assert gw.proxy.recorder.keepalive_race_retries == 1
    assert gw.proxy.recorder.recent() == []
    assert up.connections_accepted == 2
    assert handed_over() == ["ConnectionTerminated"]


async def test_client_gone_mid_response_on_the_fast_path(upstream, gateway):
    """The client closes while a big response streams on a pooled connection: recorded
    once as client_disconnected, the upstream connection is closed (never pooled), and
    nothing is left counted in flight."""
    up = await upstream("ok")
    gw = await gateway([up])
    pool, server = the_server(gw)
    client = await Raw.open(gw.port, rcvbuf=4096)
    try:
        await client.send(GET)
        await read_until(client, b"hello\n")
        assert len(pool.idle[server]) == 1
        await client.send(b"GET /bytes/100000000 HTTP/1.1\r\nHost: t\r\n\r\n")
        await eventually(lambda: up.requests_seen == 2, "the big request reached the upstream")
        await eventually(lambda: current_exchange(gw) is not None and current_exchange(gw).committed,
                         "the big response started")
        assert current_exchange(gw).fast is not None
    finally:
        client.close()
    await eventually(lambda: not gw.proxy.connections, "the client connection is gone")
    await eventually(lambda: not up._conns, "the upstream connection closed")
    assert forward_tasks() == []
    assert pool.in_flight == 0 and server.active_requests == 0 and len(pool.idle[server]) == 0
    (entry,) = gw.proxy.recorder.recent()
    assert entry["error"] == "client_disconnected"
    assert server.failures_total == 0  # never counted against the upstream


async def test_client_gone_before_the_handed_over_task_runs(upstream, gateway):
    """A fresh request hands its attempt (it needs a connect) to a task. When the client
    is gone before that task first runs, cancelling the task would unwind nothing: the
    attempt is ended where the cancel happens, recorded once, and nothing is dialled."""
    up = await upstream("ok")
    gw = await gateway([up])
    pool, server = the_server(gw)
    client = await Raw.open(gw.port)
    try:
        await eventually(lambda: len(gw.proxy.connections) == 1, "the proxy accepted the client")
        (proto,) = gw.proxy.connections
        # Both callbacks in one go, as when the request and the close are read in the same
        # loop iteration: the task created for the connect has not run yet.
        proto.data_received(GET)
        ex = proto.current
        assert ex.fast is not None and ex.task is not None and not ex.task.done()
        proto.connection_lost(None)
        assert ex.fast is None and pool.in_flight == 0 and server.active_requests == 0
        await eventually(lambda: ex.task.done(), "the cancelled task finished")
    finally:
        client.close()
    await eventually(lambda: not gw.proxy.connections, "the client connection is gone")
    assert up.connections_accepted == 0
    (entry,) = gw.proxy.recorder.recent()
    assert entry["error"] == "client_disconnected"


async def test_client_gone_before_the_deferred_write(upstream, gateway):
    """With another request in flight, the fast path writes the request once the loop
    iteration's callbacks have run. A client gone within that same iteration: the attempt ends at once, the leased
    connection is closed (never pooled again), and the write never happens."""
    up = await upstream("ok")
    gw = await gateway([up])
    pool, server = the_server(gw)
    client = await Raw.open(gw.port)
    try:
        proto, conn = await one_pooled(gw, client)
        with another_in_flight(pool):
            proto.data_received(GET)  # and, in the same iteration, the close
            ex = proto.current
            assert ex.fast is not None and ex.task is None and ex.conn is conn and conn.held
            proto.connection_lost(None)
            assert not conn.alive and pool.in_flight == 1 and server.active_requests == 0
    finally:
        client.close()
    await eventually(lambda: not up._conns, "the upstream connection closed")
    assert up.requests_seen == 1  # the second request was never written
    assert len(pool.idle[server]) == 0 and forward_tasks() == []
    (entry,) = gw.proxy.recorder.recent()
    assert entry["error"] == "client_disconnected"


@pytest.mark.parametrize("method", [b"GET", b"POST"])
async def test_an_answer_before_the_deferred_write_is_the_keepalive_race(upstream, gateway, method):
    """The upstream's bytes arrive on the just-leased connection, idle for a while, in the
    same iteration as the request, before the request has left the Outbox: typically a
    server's 408 as it times out the idle connection. They answer nothing we sent, so they never reach the
    client: the attempt fails as the keep-alive race and is retried on a fresh connection,
    for a POST too (provably unsent), and the stale connection is closed unwritten."""
    up = await upstream("ok")
    gw = await gateway([up], pool={"retries": 0})
    client = await Raw.open(gw.port)
    try:
        proto, conn = await one_pooled(gw, client)
        conn.idle_since -= forward.RACE_IDLE  # pooled that long ago (alone in the pool: held for that)
        proto.data_received(method + b" / HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n")
        assert proto.current.conn is conn and conn.held
        # and, in the same iteration, the upstream's idle-timeout answer on that connection
        conn.data_received(b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
        assert not conn.alive
        reply = await read_until(client, b"hello\n")
    finally:
        client.close()
    assert reply.startswith(b"HTTP/1.1 200 ")
    assert gw.proxy.recorder.keepalive_race_retries == 1 and gw.proxy.recorder.recent() == []
    assert up.connections_accepted == 2 and up.requests_seen == 2  # the stale one never got it


@pytest.mark.parametrize("others", [0, 1], ids=["alone", "another_in_flight"])
async def test_the_fast_path_holds_its_write_and_flush_only_while_others_are_in_flight(
        scripted, gateway, others):  # noqa: F811
    """With no other request in flight there is nothing to batch a write with: on a
    connection pooled just now, the request goes to the upstream from the callback that
    read it, and the response to the client from the callback that completed it
    (flow.Outbox holds neither). With another in flight both wait in the Outbox for the
    end of the loop iteration, to leave with the others."""
    second_seen = asyncio.Event()

    async def handler(sock, index):
        head, rest = await up.read_head(sock, b"")
        await up.loop.sock_sendall(sock, OK)
        head, rest = await up.read_head(sock, rest)  # the second: answered by the test below
        second_seen.set()
        await up.read_head(sock, rest)

    up = await scripted(handler)
    gw = await gateway([up.url])
    pool, server = the_server(gw)
    client = await Raw.open(gw.port)
    try:
        proto, conn = await one_pooled(gw, client)
        with another_in_flight(pool) if others else contextlib.nullcontext():
            proto.data_received(GET)
            assert proto.current.conn is conn
            assert conn.held == bool(others)  # queued in the Outbox, or handed to the transport
            async with asyncio.timeout(5):
                await second_seen.wait()
            conn.data_received(OK)  # the upstream's answer, as its read would deliver it
            if others:
                assert proto._wbuf and proto._flush_pending  # queued for the end of this iteration
            else:
                assert proto._wbuf == [] and not proto._flush_pending  # written to the client already
            reply = await read_until(client, b"hello\n")
    finally:
        client.close()
    assert reply.startswith(b"HTTP/1.1 200 ")
    assert len(pool.idle[server]) == 1 and pool.in_flight == 0
