"""The upstream side: one asyncio.Protocol per connection to a server.

This is the only place where OS and codec errors become ProxyErrors (STYLE §4):
connect errors by errno, then one exception per phase for what goes wrong after.

Phases of a connection and the one timer that guards each (flow.Deadline):
    IDLE       pooled; expires at the pool's idle expiry        -> closed quietly
    SENDING    request body still coming from the client: no timer (a slow client is
               the client side's business), except while the upstream does not read
               what we send (its buffer is full): idle_read       -> WriteTimeout
    WAITING    request fully sent, no head yet (response_header) -> ResponseTimeout
    BODY       head forwarded; longest silence is idle_read      -> BodyReadTimeout
While the client cannot keep up (its buffer is full) reading is paused and the BODY
timer is suspended: a slow client is not the upstream's fault.

Events go to the bound exchange (proxy/exchange.py) as plain method calls; response
bytes therefore flow upstream -> client without any await on the hot path.
"""

from __future__ import annotations

import asyncio
import errno
import ssl
import traceback
from time import perf_counter
from typing import TYPE_CHECKING, Any, Final, Protocol

from proxy.codec import make_response_parser
from proxy.codec.base import ResponseHandler
from proxy.compiled import mypyc_attr
from proxy.errors import (BodyReadTimeout, TlsProtocolError, ConnectionTerminated, ConnectRefused, ConnectTimeout,
                          DestinationUnroutable, LocalConnectError, ProxyError, ResponseIncomplete, ResponseTimeout,
                          UpstreamProtocolError, WriteTimeout)
from proxy.flow import HIGH_WATER, LOW_WATER, Deadline, Outbox
from proxy.logs import log_event
from proxy.pool import IdlePool, idle_expiry
from proxy.tls import translate, translate_after_handshake

if TYPE_CHECKING:
    from proxy.codec.base import Headers, ResponseHead
    from proxy.servers import ServerState

IDLE: Final = "idle"
SENDING: Final = "sending"
WAITING: Final = "waiting"
BODY: Final = "body"
CLOSED: Final = "closed"

_UNROUTABLE = {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN}
_REFUSED = {errno.ECONNREFUSED, errno.ECONNRESET}


def _ms(seconds: float) -> str:
    ms = seconds * 1000
    return f"{ms:.2f} ms" if ms < 1 else f"{ms:.1f} ms"


def looks_like_tls(data: bytes) -> bool:
    """A TLS record (RFC 8446 §5.1): content type 20-23, then version 3.x."""
    return len(data) >= 2 and 20 <= data[0] <= 23 and data[1] == 3


async def connect(loop: asyncio.AbstractEventLoop, ip: str, port: int, timeout: float, factory, *,
                  address: str, tls: ssl.SSLContext | None = None,
                  server_name: str | None = None) -> "UpstreamConnection":
    """Open a TCP connection to ip:port, then the TLS session over it; every failure is
    one typed ProxyError. The two steps are timed apart, so a port that accepts TCP but
    never answers a ClientHello is a TLS problem, not a connect timeout. `address` is the
    configured "host:port" named in errors (with the IP when they differ); `server_name`
    is the TLS name to send (SNI) and verify."""
    where = address if address.rsplit(":", 1)[0].strip("[]") == ip else f"{address} ({ip})"
    started = perf_counter()  # loop.time() ticks in whole ms under uvloop: too coarse to report
    try:
        async with asyncio.timeout(timeout):
            _, conn = await loop.create_connection(factory, ip, port)
    except TimeoutError:
        raise ConnectTimeout(f"connect to {where} timed out after {_ms(perf_counter() - started)} "
                             f"(timeouts.connect = {timeout:g} s)", upstream=address) from None
    except ConnectionRefusedError:
        raise ConnectRefused(f"connect to {where} ECONNREFUSED after {_ms(perf_counter() - started)}",
                             upstream=address) from None
    except OSError as exc:
        name = errno.errorcode.get(exc.errno or 0, "error")
        elapsed = _ms(perf_counter() - started)
        if exc.errno in _UNROUTABLE:
            raise DestinationUnroutable(f"connect to {where} {name} after {elapsed}", upstream=address) from None
        if exc.errno == errno.ETIMEDOUT:
            raise ConnectTimeout(f"connect to {where} ETIMEDOUT after {elapsed}", upstream=address) from None
        if exc.errno in _REFUSED:
            raise ConnectRefused(f"connect to {where} {name} after {elapsed}", upstream=address) from None
        raise LocalConnectError(f"connect to {where} {name} ({exc.strerror}) after {elapsed}",
                                upstream=address) from None
    if tls is None:
        return conn
    try:
        async with asyncio.timeout(timeout):
            transport = await loop.start_tls(conn.transport, conn, tls, server_hostname=server_name)
    except TimeoutError:
        conn.close()
        raise TlsProtocolError(f"{where} accepted the connection but gave no TLS answer within {timeout:g} s "
                               f"(timeouts.connect): does this port speak TLS?", upstream=address) from None
    except (ssl.SSLError, OSError) as exc:
        conn.close()
        raise translate(exc, upstream=address, server_name=server_name or ip) from None
    conn.connection_made(transport)
    return conn


@mypyc_attr(allow_interpreted_subclasses=True)  # health._Probe
class Peer:
    """What a connection reports its exchange's events to: an Exchange, or a health probe
    (health.py). A base class rather than a Protocol: compiled, a call through a Protocol
    is a Python method call (a lookup by name and the arguments boxed), through a base
    class a direct one (a vtable slot), and the connection makes four per request."""

    __slots__ = ()

    def on_upstream_head(self, conn: UpstreamConnection, head: ResponseHead) -> None:
        raise NotImplementedError

    def on_upstream_body(self, data: bytes) -> None:
        raise NotImplementedError

    def on_upstream_end(self, conn: UpstreamConnection, trailers: Headers) -> None:
        raise NotImplementedError

    def on_upstream_failed(self, conn: UpstreamConnection, exc: ProxyError) -> None:
        raise NotImplementedError

    def on_tunnel_open(self, conn: UpstreamConnection, rest: bytes) -> None:
        raise NotImplementedError

    def on_tunnel_data(self, data: bytes) -> None:
        raise NotImplementedError

    def on_tunnel_eof(self, conn: UpstreamConnection) -> None:
        raise NotImplementedError

    def pause_client_reading(self) -> None:
        raise NotImplementedError

    def resume_client_reading(self) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        raise NotImplementedError


class Timeouts(Protocol):
    """The timers' lengths in seconds: config.TimeoutsConfig, or a probe's (health.py)."""

    @property
    def response_header(self) -> float: ...
    @property
    def idle_read(self) -> float: ...
    @property
    def upstream_idle(self) -> float: ...


class UpstreamConnection(ResponseHandler):
    __slots__ = ("_loop", "_outbox", "_parser", "_timer", "_response_header", "_idle_read", "_upstream_idle",
                 "transport", "state", "exchange", "server", "reused", "head_seen", "request_done", "alive",
                 "idle_pool", "keepalive_timeout", "upstream_keep_alive", "_client_paused", "bytes_seen",
                 "_tunnel", "held", "idle_since")

    def __init__(self, loop: asyncio.AbstractEventLoop, server: ServerState, parser_kind: str,
                 max_head_bytes: int, timeouts: Timeouts, outbox: Outbox) -> None:
        self._loop = loop
        self._outbox = outbox
        self._parser = make_response_parser(parser_kind, self, max_head_bytes)
        self._timer = Deadline(loop, self._on_deadline)
        # The timers' lengths, copied into typed attributes (read per request)
        self._response_header = timeouts.response_header
        self._idle_read = timeouts.idle_read
        self._upstream_idle = timeouts.upstream_idle
        self.transport: Any = None  # asyncio.Transport (Any: see flow.ReadGate)
        self.state = IDLE
        self.exchange: Peer | None = None
        self.server = server
        self.reused = False
        self.head_seen = False
        self.request_done = False
        self.alive = False
        # the server's idle pool, set by whoever opened this connection
        self.idle_pool: IdlePool[UpstreamConnection] | None = None
        self.keepalive_timeout: float | None = None
        self.upstream_keep_alive = True
        self._client_paused = False
        self.bytes_seen = False
        self._tunnel = False
        self.held = False  # the request is waiting in the Outbox, not yet written (flow.Outbox)
        self.idle_since = 0.0  # loop time it was last pooled

    # -- asyncio.Protocol ------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)
        self.alive = True

    def data_received(self, data: bytes) -> None:
        ex = self.exchange
        if self._tunnel and ex is not None:
            ex.on_tunnel_data(data)
            return
        if ex is None:  # bytes on an idle connection: the upstream is confused; drop it
            self.close()
            return
        if self.held:
            # Bytes before our request was even written (it waits in the Outbox for the end
            # of this loop iteration) answer nothing we sent: typically a server's "408" as it
            # times out the idle connection we just leased. That is the keep-alive race, and
            # it is retried as one (forward.py): no byte of a response to our request was seen.
            self.fail(ConnectionTerminated("upstream sent bytes before the request was written "
                                           "(it closed the idle connection?)", upstream=self.server.address))
            return
        if not self.bytes_seen:
            self.bytes_seen = True
            if data[:1] != b"H" and looks_like_tls(data):  # "HTTP/1.1 ..." is never a TLS record
                exc = UpstreamProtocolError("response is a TLS record, not HTTP: upstream speaks TLS; "
                                            "use https://", upstream=self.server.address)
                exc.hint_variant = "tls"
                self.fail(exc)
                return
        try:
            rest = self._parser.feed(data)
        except ProxyError as exc:  # after the head, the exchange makes it http_response_incomplete
            exc.upstream = self.server.address
            self.fail(exc)
            return
        except Exception as exc:  # a bug in gatewise: proxy_internal_error, never a crash
            log_event("internal_error", where="upstream", error=repr(exc),
                      traceback=traceback.format_exc())
            self.fail(ProxyError(f"internal error: {type(exc).__name__}", upstream=self.server.address))
            return
        if rest is not None and ex is self.exchange:
            self._tunnel = True
            self._timer.cancel()  # a tunnel may idle as long as its peers like
            ex.on_tunnel_open(self, rest)
        elif self.state is BODY and not self._client_paused:
            # The body's longest silence is idle_read, counted from the end of each read:
            # one timer move per read, none per piece, and none at all for a response that
            # ends in the read that brought its head (the connection is IDLE again by then).
            self._timer.set(self._loop.time() + self._idle_read)
        if ex is not None:
            ex.flush()

    def eof_received(self) -> bool:
        ex = self.exchange
        if self._tunnel and ex is not None:
            ex.on_tunnel_eof(self)
            return True
        if ex is not None and self.head_seen and self._parser.feed_eof():
            ex.flush()
            return False
        self._lost("upstream closed the connection (FIN)")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.alive = False
        if self._tunnel and self.exchange is not None:
            self.exchange.on_tunnel_eof(self)
            self.exchange = None
        if isinstance(exc, ssl.SSLError) and self.exchange is not None and not self.head_seen:
            # The session broke after the handshake, with our request on its way: only a
            # fresh connection refused for its client certificate proves the application
            # never saw the request; anything else may have reached it.
            self.fail(translate_after_handshake(exc, upstream=self.server.address, fresh=not self.reused))
        elif exc is None:
            self._lost("upstream closed the connection")
        elif isinstance(exc, ConnectionResetError):
            self._lost("upstream reset the connection (RST)")
        else:
            self._lost(f"connection lost: {exc}")
        self._timer.close()
        self._parser.close()
        self.state = CLOSED

    def pause_writing(self) -> None:
        if self.state is SENDING:
            self._timer.set(self._loop.time() + self._idle_read)
        if self.exchange is not None:
            self.exchange.pause_client_reading()

    def resume_writing(self) -> None:
        if self.state is SENDING:
            self._timer.set(None)
        if self.exchange is not None:
            self.exchange.resume_client_reading()

    # -- driven by the exchange --------------------------------------------------------
    def begin(self, exchange: Peer, method: bytes, data: bytes, complete: bool, upgrade: bool = False,
              later: bool = False) -> None:
        """Bind to an exchange and send the request head (plus any buffered body). `later`:
        write it once the callbacks of this loop iteration have run (flow.Outbox), as a
        task would."""
        self.exchange = exchange
        self.head_seen = False
        self.bytes_seen = False
        self.request_done = complete
        self.upstream_keep_alive = True
        self._parser.start(method, upgrade)
        self.state = WAITING if complete else SENDING
        self._timer.set(self._loop.time() + self._response_header if complete else None)
        if later:
            self._outbox.write(self, data)
        else:
            self.transport.write(data)

    def send(self, data: bytes) -> None:
        self.transport.write(data)

    def send_done(self) -> None:
        self.request_done = True
        if self.state is SENDING:
            self.state = WAITING
            self._timer.set(self._loop.time() + self._response_header)

    def pause_for_client(self) -> None:
        """The client's buffer is full: stop reading, stop blaming the upstream."""
        if not self._client_paused and self.transport is not None:
            self._client_paused = True
            self.transport.pause_reading()
            if self.state is BODY:
                self._timer.set(None)

    def resume_for_client(self) -> None:
        if self._client_paused and self.transport is not None:
            self._client_paused = False
            self.transport.resume_reading()
            if self.state is BODY:
                self._timer.set(self._loop.time() + self._idle_read)

    def release(self, request_complete: bool, draining: bool) -> None:
        """The exchange is complete: back to the server's idle pool when both sides allow
        it, else closed. Pooled, it expires at pool.idle_expiry."""
        self.exchange = None
        # Bytes still queued to the upstream mean it has not read all of this request.
        if (draining or not (request_complete and self.alive and self.request_done and self.upstream_keep_alive
                             and self._parser.reusable) or self.transport.get_write_buffer_size()):
            self.close()
            return
        self.state = IDLE
        self.reused = True
        if self._client_paused:
            self.resume_for_client()
        now = self._loop.time()
        self.idle_since = now
        expires = idle_expiry(now, self._upstream_idle, self.keepalive_timeout)
        self._timer.set(expires)
        assert self.idle_pool is not None  # (set by whoever opened this connection)
        for c in self.idle_pool.put(self, expires, now):
            c.close()

    def fail(self, exc: ProxyError) -> None:
        """Give up on this connection and tell the exchange why (exactly once)."""
        ex = self.exchange
        self.exchange = None
        self.close()
        if ex is not None:
            ex.on_upstream_failed(self, exc)

    def close(self) -> None:
        self.alive = False
        self.state = CLOSED
        self._timer.cancel()
        if self.transport is not None:
            self.transport.abort()

    # -- parser events -------------------------------------------------------------------
    def on_response_head(self, head: ResponseHead) -> None:
        if self.exchange is None:  # bytes after a complete response: never ours to relay
            raise UpstreamProtocolError("response bytes with no request outstanding")
        # The exchange may refuse the head (it raises a typed error); only a head it
        # accepted moves this connection into the body phase.
        self.exchange.on_upstream_head(self, head)
        if head.status >= 200:
            self.head_seen = True
            self.state = BODY  # its timer is set once the read is parsed (data_received)

    def on_response_body(self, data: bytes) -> None:
        ex = self.exchange
        assert ex is not None  # (on_response_head refused a head with no exchange)
        ex.on_upstream_body(data)

    def on_response_end(self, trailers: Headers) -> None:
        # No timer move here: the exchange now releases this connection, which pools it
        # (re-arming the timer for idleness) or closes it (cancelling it).
        ex = self.exchange
        assert ex is not None
        ex.on_upstream_end(self, trailers)

    # -- failures -------------------------------------------------------------------------
    def _lost(self, why: str) -> None:
        if self.exchange is None:
            if self.state is IDLE and self.idle_pool is not None:
                self.idle_pool.discard(self)
            self.alive = False
            return
        address = self.server.address
        if self.head_seen:
            self.fail(ResponseIncomplete(f"{why} in the middle of the response body", upstream=address))
        else:
            self.fail(ConnectionTerminated(f"{why} before a complete response head", upstream=address))

    def _on_deadline(self) -> None:
        state = self.state
        address = self.server.address
        if state is IDLE:
            self.close()
            if self.idle_pool is not None:
                self.idle_pool.discard(self)
        elif state is BODY:
            self.fail(BodyReadTimeout(f"no body bytes for {self._idle_read:g} s "
                                      f"(timeouts.idle_read)", upstream=address))
        elif state is SENDING:
            self.fail(WriteTimeout(f"upstream read none of the request body for "
                                   f"{self._idle_read:g} s (timeouts.idle_read)", upstream=address))
        elif state is WAITING:
            self.fail(ResponseTimeout(f"no response head within {self._response_header:g} s "
                                      f"(timeouts.response_header)", upstream=address))
