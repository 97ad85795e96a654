"""One request/response exchange: the callback plumbing between a client connection
(downstream.py) and the upstream connection of the current attempt (upstream_conn.py).

Bytes move by plain method calls in both directions. The outcome of an attempt goes to
whoever waits for it (forward.py): the forward() task's future from `begin()`, or, on
the fast path, the Attempt in `fast` by plain calls (no task, no future).

Rules:
- The request body is framed once, as it arrives, and kept while it is small
  (REPLAY_LIMIT) so a failed attempt can be replayed on another server. A larger body
  that has started to flow cannot be replayed: that attempt is final.
- The response is committed when its head is written to the client. After that there
  is no retry and no error page: a failure aborts the client connection (STYLE §4),
  because a clean end would hide the cut.
- Backpressure: when the client's buffer is full, reading from the upstream pauses;
  when the upstream's buffer is full, reading from the client pauses (flow.ReadGate).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Final

from proxy import headers as H
from proxy.errors import AwaitingHead, ProxyError, ResponseIncomplete, UnsupportedTransferCoding
from proxy.flow import BUFFERING, HIGH_WATER, PEER_FULL
from proxy.upstream_conn import Peer

if TYPE_CHECKING:
    from proxy.codec.base import Headers, RequestHead, ResponseHead
    from proxy.downstream import DownstreamProtocol
    from proxy.forward import Attempt
    from proxy.runtime import PoolRuntime
    from proxy.upstream_conn import UpstreamConnection

# Request bodies up to this size are kept for a retry on another server.
REPLAY_LIMIT: Final = 64 * 1024
perf_counter: Final = time.perf_counter  # (as in downstream.py)


class Exchange(Peer):
    __slots__ = ("client", "head", "target", "started", "task", "conn", "_waiter",
                 "body_chunks", "body_size", "body_received", "body_complete", "replayable",
                 "committed", "finished", "framing", "keep_alive", "status", "attempts", "tunnel_rest",
                 "pool", "head_at", "head_bytes", "fast")

    def __init__(self, client: DownstreamProtocol, head: RequestHead, started: float) -> None:
        self.client = client
        self.head = head  # scanned (headers.scan_request)
        self.target = head.target
        self.started = started
        self.task: asyncio.Task | None = None
        self.conn: UpstreamConnection | None = None
        self._waiter: asyncio.Future | None = None
        # request body
        self.body_chunks: list[bytes] = []   # framed, as the upstream will see them
        self.body_size = 0
        self.body_received = 0
        self.body_complete = head.framing == H.NO_BODY and not head.upgrade
        self.replayable = True
        # response
        self.committed = False
        self.finished = False
        self.framing = H.NO_BODY
        self.keep_alive = head.keep_alive
        self.status = 0
        self.attempts: list[dict[str, object]] = []
        self.tunnel_rest = b""  # client bytes after an Upgrade head, held until the 101
        self.pool: PoolRuntime | None = None  # the pool it was routed to
        self.head_at = 0.0  # perf_counter when the final (or 101) response head arrived
        self.head_bytes = b""  # the head sent upstream (forward.py builds it once per exchange)
        self.fast: Attempt | None = None  # when the fast path owns the attempt (no task waits)

    # -- request body, from the client ------------------------------------------------
    def on_client_body(self, data: bytes) -> None:
        self.body_received += len(data)
        if self.head.framing == H.CHUNKED:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        self._body_out(data)

    def on_client_end(self, trailers: Headers) -> None:
        if self.head.framing == H.CHUNKED:
            self._body_out(H.trailer_block(trailers))
        self.body_complete = True
        conn = self.conn
        if conn is not None:
            conn.send_done()
        self.client.gate.resume(BUFFERING)

    def _body_out(self, data: bytes) -> None:
        if self.replayable:
            self.body_chunks.append(data)
            self.body_size += len(data)
        conn = self.conn
        if conn is not None:
            conn.send(data)
            if self.body_size > REPLAY_LIMIT:
                self._drop_replay()
        elif self.body_size > HIGH_WATER:  # no upstream yet: hold a bounded amount
            self.client.gate.pause(BUFFERING)

    def _drop_replay(self) -> None:
        self.replayable = False
        self.body_chunks = []

    # -- attempts, from forward.py -------------------------------------------------------
    def begin(self, conn: UpstreamConnection, head_bytes: bytes) -> asyncio.Future[None]:
        """Send the request on conn; the future completes with the response or fails."""
        # the client's loop, not asyncio.get_running_loop(): on CPython 3.11 that costs a
        # getpid() syscall per call (measured: 7% of samples on the hot path)
        self._waiter = fut = self.client.loop.create_future()
        self.send(conn, head_bytes)
        return fut

    def send(self, conn: UpstreamConnection, head_bytes: bytes, later: bool = False) -> None:
        """Send the request on conn (plus the body received so far); `later`: see
        UpstreamConnection.begin."""
        self.conn = conn
        if self.body_chunks:
            head_bytes += b"".join(self.body_chunks)
        conn.begin(self, self.head.method, head_bytes, self.body_complete, self.head.upgrade, later)
        if self.body_size > REPLAY_LIMIT:
            self._drop_replay()
        gate = self.client.gate
        if gate.reasons:
            gate.resume(BUFFERING)

    def detach(self) -> None:
        """The attempt is over without a response (failure or cancellation)."""
        conn, self.conn = self.conn, None
        if conn is not None and conn.exchange is self:
            conn.exchange = None
            conn.close()
        self.client.gate.resume(PEER_FULL)  # a pause caused by that upstream ends with it

    # -- response, from the upstream connection ----------------------------------------
    def on_upstream_head(self, conn: UpstreamConnection, head: ResponseHead) -> None:
        client = self.client
        proxy = client.proxy
        status = head.status
        if status < 200:
            if status == 101 and self.head.upgrade:
                plan = H.plan_response(head, request_method=self.head.method,
                                       client_version=self.head.version, client_keep_alive=False,
                                       request_id=self.head.request_id_bytes, via=proxy.via,
                                       proxy_status=None)
                self.committed = True
                self.status = 101
                self.head_at = perf_counter()  # the server's latency sample: start to the 101
                client.out(plan.rewritten)
            elif self.head.version == b"1.1":  # RFC 9110 §15.2: forward 1xx to 1.1 clients
                client.out(H.plan_response(head, request_method=self.head.method,
                                           client_version=b"1.1", client_keep_alive=True,
                                           request_id=b"", via=proxy.via, proxy_status=None).rewritten)
            return
        proxy_status = None
        if status >= 500:
            proxy_status = proxy.received_status_member(conn.server.address, status)
        request = self.head
        plan = H.plan_response(head, request_method=request.method, client_version=request.version,
                               client_keep_alive=self.keep_alive and not client.closing,
                               request_id=request.request_id_bytes, via=proxy.via,
                               proxy_status=proxy_status)
        if plan.problem is not None:
            raise UnsupportedTransferCoding(plan.problem, upstream=conn.server.address)
        self.committed = True
        self.status = status
        self.head_at = perf_counter()
        self.framing = plan.framing
        self.keep_alive = plan.keep_alive
        conn.keepalive_timeout = plan.keepalive_timeout
        conn.upstream_keep_alive = plan.upstream_keep_alive
        client.out(plan.rewritten)

    def on_upstream_body(self, data: bytes) -> None:
        if self.framing == H.CHUNKED:
            self.client.out(b"%x\r\n" % len(data))
            self.client.out(data)
            self.client.out(b"\r\n")
        else:
            self.client.out(data)

    def on_upstream_end(self, conn: UpstreamConnection, trailers: Headers) -> None:
        if self.framing == H.CHUNKED:
            self.client.out(H.trailer_block(trailers))
        self.finished = True
        self.conn = None
        client = self.client
        if client.gate.reasons:
            client.gate.resume(PEER_FULL)
        # A declined Upgrade leaves the upstream unsure what follows: never pool it.
        conn.release(self.body_complete and not self.head.upgrade, client.proxy.draining)
        if self.fast is not None:
            self.fast.on_end(self)
        elif self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        client.exchange_done(self)

    def on_upstream_failed(self, conn: UpstreamConnection, exc: ProxyError) -> None:
        if conn is not self.conn:
            return
        self.conn = None
        self.client.gate.resume(PEER_FULL)
        if self.committed and isinstance(exc, AwaitingHead):
            exc = ResponseIncomplete(f"{exc.detail} (after the response head was forwarded)",
                                     upstream=exc.upstream)
        if self.fast is not None:
            self.fast.on_failed(self, exc)
        elif self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)

    # -- tunnel (Upgrade, RFC 9110 §7.8) ---------------------------------------------------
    def on_tunnel_open(self, conn: UpstreamConnection, rest: bytes) -> None:
        self.client.open_tunnel(self, rest)

    def on_tunnel_data(self, data: bytes) -> None:
        self.client.out(data)
        self.client.flush()

    def on_tunnel_eof(self, conn: UpstreamConnection) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        self.finished = True
        self.client.close()

    # -- flow control ------------------------------------------------------------------------
    def pause_client_reading(self) -> None:
        self.client.gate.pause(PEER_FULL)

    def resume_client_reading(self) -> None:
        self.client.gate.resume(PEER_FULL)

    def pause_upstream_reading(self) -> None:
        conn = self.conn
        if conn is not None:
            conn.pause_for_client()

    def resume_upstream_reading(self) -> None:
        conn = self.conn
        if conn is not None:
            conn.resume_for_client()

    def flush(self) -> None:
        """Send what the upstream's read produced. A finished exchange has been flushed by
        exchange_done, or queued there for the end of this loop iteration (flush_soon):
        flushing it here would undo that batching."""
        if not self.finished:
            self.client.flush()
