"""The client side: one asyncio.Protocol per client connection.

It drives the request codec, hands each request to forward.py, answers malformed
requests itself (400/408/413/431 with Proxy-Status), and owns the client's one timer:
    IDLE   keep-alive, waiting for a request     client_idle    -> close quietly
    HEAD   first bytes of a head seen            client_header  -> 408
           (a pipelined head that began earlier: from when the response before it is
           handed over, and again once the client reads it if it was not reading)
    BUSY   a request in flight; while its body is being read, client_idle is the longest
           silence (-> 408, or abort once the response started); while the client does
           not read our writes, client_idle is the longest stall (-> abort)
Pipelined requests are answered in order (RFC 9112 §9.3.2): later ones wait in a
queue while reading pauses.
"""

from __future__ import annotations

import asyncio
import time
import traceback
from collections import deque
from typing import TYPE_CHECKING, Any, Final

from proxy import headers as H
from proxy.codec import make_request_parser
from proxy.codec.base import Headers, RequestHandler, RequestHead
from proxy.errors import BadRequest, ClientFault, ClientTimeout, ProxyError, RequestBodyTooLarge
from proxy.exchange import Exchange
from proxy.flow import HIGH_WATER, LOW_WATER, QUEUED, Deadline, ReadGate
from proxy import forward
from proxy.logs import log_event

if TYPE_CHECKING:
    from proxy.runtime import Proxy

# Final: a C static in the compiled module, not a module dict lookup per call
perf_counter: Final = time.perf_counter

IDLE: Final = "idle"
HEAD: Final = "head"
BUSY: Final = "busy"


def _total(pieces: list[bytes]) -> int:
    """Bytes in pieces (a loop: compiled, cheaper than sum(map(len, ...)), two calls)."""
    n = 0
    for piece in pieces:
        n += len(piece)
    return n


class _Rejection:
    """A refused request waiting in the pipeline queue for its turn to be answered."""

    __slots__ = ("exchange", "error")

    def __init__(self, exchange: Exchange | None, error: ProxyError) -> None:
        self.exchange = exchange
        self.error = error


class DownstreamProtocol(RequestHandler):
    __slots__ = ("proxy", "loop", "transport", "gate", "client_ip", "_parser", "_timer", "state",
                 "current", "receiving", "queue", "closing", "_wbuf", "out", "_write_paused",
                 "_closed", "_tunnel", "_refused_head", "_head_deadline", "_next_waits", "_flush_pending")

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.loop = proxy.loop
        self.transport: Any = None  # asyncio.Transport (Any: see flow.ReadGate)
        self.gate = ReadGate()
        self.client_ip = b"unknown"
        self._parser = make_request_parser(proxy.parser_kind, self,
                                           proxy.cfg.limits.max_request_header_bytes)
        self._timer = Deadline(self.loop, self._on_deadline)
        self.state = IDLE
        self.current: Exchange | None = None     # the exchange whose response is being served
        self.receiving: Exchange | None = None   # the exchange whose request is being read
        self.queue: deque[Exchange | _Rejection] = deque()
        self.closing = False                     # answer what is in flight, then close
        self._wbuf: list[bytes] = []
        # out(data): queue bytes for the client, sent by flush(). The list's own append:
        # called for every piece of every response, it costs no Python frame.
        self.out = self._wbuf.append
        self._write_paused = False
        self._closed = False
        self._tunnel: Exchange | None = None
        self._refused_head: Exchange | None = None  # refused in on_request_head itself
        self._head_deadline = 0.0  # absolute: the head being read must be complete by then
        self._next_waits = False   # a pipelined request waits for the client to drain
        self._flush_pending = False  # a flush is scheduled for the end of this loop iteration

    # -- asyncio.Protocol ------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.gate.attach(transport)
        transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)
        peer = transport.get_extra_info("peername")
        if peer:
            self.client_ip = str(peer[0]).encode()
        proxy = self.proxy
        if len(proxy.connections) >= proxy.cfg.limits.max_client_connections:
            transport.abort()  # over the cap: refuse before reading anything
            return
        proxy.connections.add(self)
        if proxy.draining:
            self.closing = True
        # The first request gets client_header from the moment the connection opens.
        self._enter_head()
        self._timer.set(self._head_deadline)

    def data_received(self, data: bytes) -> None:
        if self._tunnel is not None:
            self._tunnel_send(data)
            return
        began = self.state is IDLE
        if began:
            self._enter_head()
        try:
            rest = self._parser.feed(data)
        except ClientFault as exc:
            self._reject(exc)
            return
        except ProxyError as exc:  # raised by an exchange while taking body bytes
            self._reject(exc)
            return
        except Exception as exc:  # a bug in gatewise: 500 proxy_internal_error, never a crash
            log_event("internal_error", where="downstream", error=repr(exc),
                      traceback=traceback.format_exc())
            self._reject(ProxyError(f"internal error: {type(exc).__name__}"))
            return
        if rest is not None:
            self._await_tunnel(rest)
        elif began and self.state is HEAD:  # a head this read began, still incomplete: time it
            self._timer.set(self._head_deadline)
        if self._wbuf:  # (usually nothing: requests go upstream, answers come later)
            self.flush()

    def eof_received(self) -> bool:
        if self._tunnel is not None:  # pass the half-close through the tunnel
            conn = self._tunnel.conn
            if conn is not None and conn.transport is not None and conn.transport.can_write_eof():
                conn.transport.write_eof()
            return True
        # Like nginx (proxy_ignore_client_abort off): a client that closes its side is
        # gone; what it had in flight is cancelled and recorded as client_disconnected.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._timer.close()
        proxy = self.proxy
        proxy.connections.discard(self)
        if proxy.draining and not proxy.connections:
            proxy.all_closed.set()
        ex = self.current
        if ex is not None:
            forward.cancel(ex)  # forward.py cleans up; it records only what is not yet recorded
        if self._tunnel is not None:
            self._tunnel.detach()
        self.queue.clear()
        # Break the cycles through this protocol (parser, exchanges): freed now, not
        # whenever the cyclic GC runs. A cancelled exchange keeps its own reference.
        self._parser.close()
        self.current = self.receiving = self._refused_head = self._tunnel = None

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.current is not None:
            self.current.pause_upstream_reading()
        self._timer.set(self.loop.time() + self.proxy.client_idle)

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.current is not None:
            self.current.resume_upstream_reading()
        if self._next_waits:
            self._next_waits = False
            self._next()
        if self.state is HEAD and self.current is None:
            # A head begun behind a response the client had not read: its client_header
            # starts now that the client reads (as nginx times the next head once the
            # response is sent). At most once: with nothing in flight, nothing more is
            # written to pause on.
            self._enter_head()
        self._rearm()

    # -- codec events ------------------------------------------------------------------
    def on_request_head(self, head: RequestHead) -> None:
        proxy = self.proxy
        H.scan_request(head, proxy.proxy_name_b)
        ex = Exchange(self, head, perf_counter())
        self.receiving = ex
        if head.problem is not None:
            self._refused_head = ex  # the rejection belongs to this request
            raise BadRequest(head.problem)
        limit = proxy.max_request_body
        if limit and head.framing == H.LENGTH and head.content_length > limit:
            self._refused_head = ex
            raise RequestBodyTooLarge(f"Content-Length {head.content_length} over "
                                      f"limits.max_request_body_bytes = {limit}")
        self.state = BUSY
        if not ex.body_complete:  # else on_request_end follows in this same feed and rearms
            self._rearm()
        if self.current is None:
            self.current = ex
            forward.start(proxy, ex)
        else:
            self.queue.append(ex)
            self.gate.pause(QUEUED)

    def on_request_body(self, data: bytes) -> None:
        ex = self.receiving
        assert ex is not None  # (the codec calls this only after on_request_head)
        limit = self.proxy.max_request_body
        if limit and ex.body_received + len(data) > limit:
            raise RequestBodyTooLarge(f"request body over limits.max_request_body_bytes = {limit}")
        self._timer.extend(self.loop.time() + self.proxy.client_idle)
        ex.on_client_body(data)

    def on_request_end(self, trailers: Headers) -> None:
        ex = self.receiving
        assert ex is not None
        if not ex.body_complete:
            ex.on_client_end(trailers)
            self._rearm()
        elif self._write_paused:
            self._rearm()  # the client does not read: its stall deadline, not the head's
        # else a request without a body, complete at its head: nothing to time on this side
        # until its response is out. The deadline armed before it is left as it is: if it
        # fires meanwhile it finds nothing to do (_on_deadline), which costs less than
        # disarming it for every request.

    # -- serving -----------------------------------------------------------------------

    def exchange_done(self, ex: Exchange) -> None:
        """The whole response for `ex` has been handed to the transport (or is queued
        for the end of this loop iteration: see flush_soon)."""
        pool = ex.pool
        if self.queue:
            self.flush()  # whether the next request may start depends on this write
        elif pool is not None and pool.in_flight == 0:
            self.flush()  # nothing else in flight to batch with (as forward.start's write)
        else:
            self.flush_soon()
        if ex is not self.current:
            return
        self.current = None
        if self._closed:
            return
        if not ex.keep_alive or not ex.body_complete:
            self.close()  # the client was told (or must learn) that this is the last answer
        elif self.queue:
            if self._write_paused:  # the client is not reading: start nothing new for it yet
                self._next_waits = True
            else:
                self._next()
        elif self.closing:
            self.close()
        elif self.receiving is ex:  # no request after it yet
            if self._parser.in_head():
                # Part of the next head came with this request (pipelined): its
                # client_header starts now that it is its turn (RFC 9112 §9.3.2), not once
                # more of it arrives. While the client does not read this response, its
                # stall allowance (client_idle) applies instead, and the head's clock
                # starts again once it reads (resume_writing).
                self._enter_head()
                self._rearm()
            else:  # idle (_rearm's case, without the call)
                self.state = IDLE
                self._timer.set(self.loop.time() + self.proxy.client_idle)
        else:
            self._rearm()

    def _next(self) -> None:
        """Serve the next pipelined item: a request, or a rejection queued behind them."""
        item = self.queue.popleft()
        if isinstance(item, _Rejection):
            self.queue.clear()
            self._answer_rejection(item.exchange, item.error)
            return
        if not self.queue:
            self.gate.resume(QUEUED)
        # Never the fast path here: this runs inside the upstream's callbacks, and the
        # connection they just released would be leased again before its parser returns.
        self.current = item
        forward.start_task(self.proxy, item)

    def send_error(self, ex: Exchange | None, exc: ProxyError) -> None:
        """Answer with a gatewise-generated error (never after a response head)."""
        proxy = self.proxy
        keep_alive = (ex is not None and ex.keep_alive and ex.body_complete and not self.closing
                      and not isinstance(exc, ClientFault))
        data = proxy.error_response(ex, exc, keep_alive=keep_alive)
        if ex is not None:
            ex.committed = True
            ex.finished = True
            ex.keep_alive = keep_alive
        self.out(data)
        if ex is not None:
            self.exchange_done(ex)
        else:
            self.flush()
            self.close()

    def _reject(self, exc: ProxyError) -> None:
        """The codec, a limit or a timer refused what the client sent. Requests already
        received are answered first (RFC 9112 §9.3.2 keeps responses in order); then
        the rejection is answered and the connection closed. Nothing more is read."""
        self.gate.pause(QUEUED)
        ex = self._refused_head or self.receiving
        if ex is not self._refused_head and (ex is None or ex.body_complete or ex.finished):
            ex = None  # the error is in a new request that never became an exchange
        if ex is not None and ex is self.current:
            if ex.committed:  # the response is already streaming: only an abort is honest
                ex.finished = True
                self.proxy.record(ex, exc)
                self.abort()
                return
            ex.finished = True  # tells forward.py this cancellation is ours, not the client's
            forward.cancel(ex)
            ex.detach()
            self.queue.clear()
            self._answer_rejection(ex, exc)
            return
        if ex is not None and ex in self.queue:  # drop it and anything read after it
            while self.queue.pop() is not ex:
                pass
        self.queue.append(_Rejection(ex, exc))
        if self.current is None:
            self._next()

    def _answer_rejection(self, ex: Exchange | None, exc: ProxyError) -> None:
        self.closing = True
        self.current = None
        if ex is not None:
            ex.finished = True
        self.out(self.proxy.error_response(ex, exc, keep_alive=False))
        self.close()

    # -- tunnel (Upgrade) ------------------------------------------------------------
    def _await_tunnel(self, rest: bytes) -> None:
        """An upgrade request's head is parsed: hold any bytes after it until the
        upstream agrees (101) or answers normally (then the connection closes after)."""
        ex = self.receiving
        assert ex is not None
        ex.tunnel_rest = rest  # not HTTP: sent only once the upstream has switched
        self.gate.pause(QUEUED)
        ex.keep_alive = False

    def open_tunnel(self, ex: Exchange, upstream_rest: bytes) -> None:
        self._tunnel = ex
        self._timer.set(None)
        if ex.tunnel_rest:
            self._tunnel_send(ex.tunnel_rest)
            ex.tunnel_rest = b""
        if upstream_rest:
            self.out(upstream_rest)
        self.flush()
        self.gate.resume(QUEUED)

    def _tunnel_send(self, data: bytes) -> None:
        conn = self._tunnel.conn if self._tunnel is not None else None
        if conn is not None:
            conn.transport.write(data)

    # -- output ---------------------------------------------------------------------------
    def flush(self) -> None:
        self._flush_pending = False
        buf = self._wbuf
        if buf and not self._closed:
            if len(buf) == 1:
                self.transport.write(buf[0])
            elif _total(buf) <= 65536:
                # one small copy beats writev: a head plus a short body is the common case
                self.transport.write(b"".join(buf))
            else:
                self.transport.writelines(buf)
            buf.clear()  # the transport keeps the bytes, not the list

    def flush_soon(self) -> None:
        """Flush once the callbacks of this loop iteration have run (flow.Outbox): the
        responses that end in one iteration then leave together."""
        if self._wbuf and not self._flush_pending:
            self._flush_pending = True
            self.proxy.outbox.flush(self)

    def close(self) -> None:
        self.flush()
        if not self._closed and self.transport is not None:
            self.transport.close()  # flushes what is buffered, then closes

    def abort(self) -> None:
        self._wbuf.clear()
        if self.transport is not None:
            self.transport.abort()

    def drain(self) -> None:
        """Graceful shutdown: close now when idle, else after the response in flight."""
        self.closing = True
        if self.current is None and self.state is not BUSY:
            self.close()

    # -- timer ----------------------------------------------------------------------------
    def _enter_head(self) -> None:
        """A head begins (its deadline is armed only if it is still incomplete after the
        read that began it: the usual head arrives whole, and the idle timer then stays)."""
        self.state = HEAD
        self._head_deadline = self.loop.time() + self.proxy.client_header

    def _rearm(self) -> None:
        idle = self.proxy.client_idle
        now = self.loop.time()
        if self._write_paused:
            self._timer.set(now + idle)
        elif self.state is HEAD:
            self._timer.set(self._head_deadline)
        elif self.state is IDLE:
            self._timer.set(now + idle)
        elif self.receiving is not None and not self.receiving.body_complete:
            self._timer.set(now + idle)
        else:
            self._timer.set(None)

    def _on_deadline(self) -> None:
        t = self.proxy.cfg.timeouts
        if self._write_paused:
            ex = self.current
            if ex is not None and not ex.finished:
                ex.finished = True  # recorded here, once; the cancellation that follows is ours
                self.proxy.record(ex, ClientTimeout(
                    f"client read nothing for {t.client_idle:g} s (timeouts.client_idle)"))
            self.abort()
        elif self.state is IDLE:
            self.close()
        elif self.state is HEAD:
            self._reject(ClientTimeout(f"no complete request head within {t.client_header:g} s "
                                       f"(timeouts.client_header)"))
        elif self.receiving is None or self.receiving.body_complete:
            return  # a request in flight with nothing left to read: nothing to time here
        elif self.gate.paused:  # we stopped reading (the upstream is full): not the client's fault
            self._timer.set(self.loop.time() + t.client_idle)
        else:
            self._reject(ClientTimeout(f"request body stalled for {t.client_idle:g} s "
                                       f"(timeouts.client_idle)"))
