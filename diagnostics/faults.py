"""A real HTTP/1.1 upstream that fails on purpose: one mode per row of SPEC.md's error table.

Used in-process by the test suite and by people via `gatewise faults --listen H:P --mode M`.

Rules:
- A request is read completely (head and body) before its fault is applied, so a fault
  never races the client's write. Exceptions: `tls` sends its alert on the first bytes, as
  a TLS server does when a record header does not parse, and `hang` never sends anything.
- Linux answers a close() with unread bytes in the receive queue with RST instead of FIN.
  asyncio reads eagerly, so `close` and `close_after` give a clean FIN; `reset` asks for
  RST on purpose with SO_LINGER {on, 0}.
- No task per connection: delays are `call_later` handles and big bodies are pumped from
  pause_writing/resume_writing, so close() aborts everything synchronously and leaks nothing.
- One request is answered at a time per connection; pipelined requests queue, and reading
  pauses once MAX_QUEUED are waiting (bounded memory).
- Never imports `proxy`: diagnostics never does.
- `ssl=` (a server-side SSLContext) makes any mode speak TLS and `.url` https://. TLS runs
  on memory BIOs (`_TLS`) rather than the event loop's own TLS, because both asyncio and
  uvloop drop the fatal alert when a server-side handshake fails; a real TLS server sends
  it, and clients (the proxy) must see it. Apart from that it keeps the rules above:
  close() sends close_notify then FIN, `reset` still resets, no task per connection.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import math
import random
import signal
import socket
import ssl as _ssl
import struct
import sys
from collections import deque
from collections.abc import Iterator
from http import HTTPStatus

import httptools
import orjson

MODES = ("ok", "refuse", "blackhole", "hang", "slow:SECONDS", "reset", "close", "garbage", "tls",
         "truncate", "stall", "huge-header", "status:CODE", "flaky:P")
_NAMES = {m.partition(":")[0]: m for m in MODES}

PIECE = 64 * 1024                       # body write size for /bytes and /chunked
_BLOCK = bytes(range(256)) * (PIECE // 256)
MAX_QUEUED = 8                          # pipelined requests held before reading pauses
GARBAGE = b"\x00\x01garbage that is not HTTP\r\n\r\n"
# A TLS record: content type 21 (alert), version 3.3, length 2, fatal(2) protocol_version(70)
# (RFC 8446 section 6): what a TLS server says to a plaintext "GET / HTTP/1.1".
TLS_ALERT = b"\x15\x03\x03\x00\x02\x02\x46"
PARTIAL_LENGTH, PARTIAL_SENT = 1_000_000, 1000   # truncate / stall: promised vs sent
HUGE_HEAD_BYTES = 200 * 1024
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def parse_mode(text: str) -> tuple[str, float | int | None]:
    """`"slow:0.5"` -> `("slow", 0.5)`; `"status:503"` -> `("status", 503)`; `"hang"` -> `("hang", None)`."""
    name, sep, arg = text.strip().partition(":")
    if name not in _NAMES:
        raise ValueError(f"unknown fault mode {text!r}; expected one of: {', '.join(MODES)}")
    usage = _NAMES[name]
    if ":" not in usage:
        if sep:
            raise ValueError(f"fault mode {name!r} takes no argument (got {text!r})")
        return name, None
    try:
        value: float | int = int(arg) if name == "status" else float(arg)
    except ValueError:
        raise ValueError(f"fault mode {usage} needs a number after ':' (got {text!r})") from None
    if name == "slow" and not (math.isfinite(value) and value >= 0):
        raise ValueError(f"slow:SECONDS needs SECONDS >= 0 (got {arg!r})")
    if name == "status" and not 200 <= value <= 599:
        raise ValueError(f"status:CODE needs a final status 200-599 (got {arg!r})")
    if name == "flaky" and not 0.0 <= value <= 1.0:
        raise ValueError(f"flaky:P needs a probability 0.0-1.0 (got {arg!r})")
    return name, value


_REASONS = {status.value: status.phrase for status in HTTPStatus}


@functools.cache
def _status_line(code: int) -> bytes:
    return f"HTTP/1.1 {code} {_REASONS.get(code, 'Unknown')}\r\n".encode()


def _pieces(n: int, chunked: bool) -> Iterator[bytes]:
    """n body bytes in PIECE-sized writes, never n bytes at once (n may be 500 MB)."""
    left = n
    while left > 0:
        k = min(left, PIECE)
        piece = _BLOCK if k == PIECE else _BLOCK[:k]
        yield b"%x\r\n%b\r\n" % (k, piece) if chunked else piece
        left -= k
    if chunked:
        yield b"0\r\nX-Checksum: %d\r\n\r\n" % n


def _acceptq_full(sock: socket.socket) -> bool | None:
    """Linux: TCP_INFO on a listener reports accept-queue length (unacked) and backlog (sacked)."""
    try:
        unacked, backlog = struct.unpack_from("II", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104), 24)
    except (AttributeError, OSError, struct.error):
        return None
    return unacked > backlog


class _Request:
    __slots__ = ("method", "target", "headers", "body_bytes", "sha", "keep_alive", "expect")

    def __init__(self) -> None:
        self.method, self.target, self.headers = "", b"", []
        self.body_bytes, self.sha, self.keep_alive, self.expect = 0, None, True, False


class _Conn(asyncio.Protocol):
    """One accepted connection: parse with llhttp, then answer (or fail) per the server's mode."""

    def __init__(self, server: FaultServer) -> None:
        self.s, self.loop = server, server._loop
        self.transport: asyncio.Transport | None = None
        self.parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self.req: _Request | None = None                 # being parsed
        self.queue: deque[_Request | None] = deque()     # complete, unanswered; None = parse error
        self.busy = self.closing = self.alerted = self.in_next = False
        self.write_paused = self.read_paused = self.throttled = False
        self.answered = 0
        self.pump: Iterator[bytes] | None = None         # body pieces still to write
        self.pump_keep_alive = True
        self.timer: asyncio.TimerHandle | None = None   # busy: deferred answer; idle: keepalive_timeout
        self.read_timer: asyncio.TimerHandle | None = None  # read_rate resume
        self.read_paid_at = 0.0   # read_rate: loop time at which the bytes read so far are "paid"

    # -- transport events
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.s._conns.add(self)
        self.s.connections_accepted += 1
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing, self.pump = True, None
        self.s._conns.discard(self)
        self._cancel_timer()
        if self.read_timer is not None:
            self.read_timer.cancel()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._pump()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        if not self.busy:
            self._cancel_timer()
        if self.s.mode == "tls" and not self.alerted:
            self.alerted = True
            self.transport.write(TLS_ALERT)
        if self.s.read_rate:   # pay for these bytes: stop reading until they are paid for
            now = self.loop.time()
            self.read_paid_at = max(self.read_paid_at, now) + len(data) / self.s.read_rate
            if self.read_paid_at - now > 0.001 and self.read_timer is None:
                self.throttled = True
                self.read_timer = self.loop.call_later(self.read_paid_at - now, self._unthrottle)
        if self.parser is not None:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                self.parser = None   # the request was queued; what follows is not HTTP: ignore it
            except httptools.HttpParserError:
                self.parser = None
                self.queue.append(None)
                self._next()
        self._sync_reading()

    # -- llhttp callbacks
    def on_message_begin(self) -> None:
        self.req = _Request()

    def on_url(self, url: bytes) -> None:
        self.req.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        n, v = name.decode("latin-1"), value.decode("latin-1")
        self.req.headers.append([n, v])
        if n.lower() == "expect" and v.strip().lower() == "100-continue":
            self.req.expect = True

    def on_headers_complete(self) -> None:
        req = self.req
        req.method = self.parser.get_method().decode("latin-1")
        req.keep_alive = self.parser.should_keep_alive()
        if req.target.split(b"?", 1)[0] == b"/echo":
            req.sha = hashlib.sha256()
        self._maybe_continue()

    def on_body(self, body: bytes) -> None:
        self.req.body_bytes += len(body)
        if self.req.sha is not None:
            self.req.sha.update(body)

    def on_message_complete(self) -> None:
        req, self.req = self.req, None
        self.s.requests_seen += 1
        self.s.last_request = {"method": req.method, "path": req.target.decode("latin-1"),
                               "headers": req.headers, "body_bytes": req.body_bytes}
        self.s._seen.set()
        self.queue.append(req)
        self._next()

    # -- request scheduling
    def _next(self) -> None:
        if self.in_next:
            return   # re-entered from a synchronous _done(): the loop below picks it up
        self.in_next = True
        try:
            while not self.busy and not self.closing and self.queue:
                self._dispatch(self.queue.popleft())
        finally:
            self.in_next = False
        if not self.busy and not self.queue and not self.closing:
            self._maybe_continue()
            if self.req is None:
                self._arm_idle()
        self._sync_reading()

    def _dispatch(self, req: _Request | None) -> None:
        s, mode = self.s, self.s.mode
        self.busy = True
        if req is None:   # unparseable: a plain HTTP server says 400; the faults stay in character
            if mode in ("ok", "slow", "flaky"):
                self._send(None, 400, b"bad request\n")
            else:
                self._act(mode, None)
            return
        if s.close_after is not None and self.answered >= s.close_after:
            self._close()   # the keep-alive race: FIN instead of an answer
            return
        if mode == "flaky":
            mode = "reset" if s.rng.random() < s.arg else "ok"
        delay = s.arg if mode == "slow" else 0.0
        if s.read_rate:
            delay = max(delay, self.read_paid_at - self.loop.time())
        if delay > 0:
            self.timer = self.loop.call_later(delay, self._act, mode, req)
        else:
            self._act(mode, req)

    def _act(self, mode: str, req: _Request | None) -> None:
        self.timer = None
        if self.closing:
            return
        if mode in ("ok", "slow"):
            self._route(req)
        elif mode == "status":
            code = int(self.s.arg)
            body = b"" if code in (204, 304) else _status_line(code)[9:]   # "503 Service Unavailable\r\n"
            self._send(req, code, body)
        elif mode == "huge-header":
            self._send(req, 200, b"huge header\n", extra=self.s._filler)
        elif mode == "reset":
            self._reset()
        elif mode == "garbage":
            self.transport.write(GARBAGE)
            self._close()
        elif mode in ("close", "tls"):
            self._close()
        elif mode in ("truncate", "stall"):
            self.transport.write(self._head(200, b"Content-Length: %d\r\n" % PARTIAL_LENGTH, True)
                                 + _BLOCK[:PARTIAL_SENT])
            if mode == "truncate":
                self._close()
        # hang, stall: stay busy forever; the connection stays open until the peer or close() ends it

    def _route(self, req: _Request) -> None:
        path = req.target.split(b"?", 1)[0]
        if path == b"/health":
            self._send(req, 200, b"ok\n")
        elif path == b"/echo":
            self._send(req, 200, orjson.dumps({
                "method": req.method, "path": req.target.decode("latin-1"), "headers": req.headers,
                "body_bytes": req.body_bytes, "body_sha256": req.sha.hexdigest()}),
                extra=b"Content-Type: application/json\r\n")
        elif path.startswith((b"/bytes/", b"/chunked/")):
            chunked = path.startswith(b"/chunked/")
            arg = path.rsplit(b"/", 1)[1]
            if not arg.isdigit():
                self._send(req, 400, b"expected /bytes/N or /chunked/N\n")
                return
            n = int(arg)
            framing = (b"Transfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n" if chunked
                       else b"Content-Length: %d\r\n" % n)
            self.transport.write(self._head(200, framing, req.keep_alive))
            if req.method == "HEAD":
                self._done(req.keep_alive)
                return
            self.pump, self.pump_keep_alive = _pieces(n, chunked), req.keep_alive
            self._pump()
        elif path == b"/close":   # close-delimited body (RFC 9112 section 6.3, rule 8)
            self.transport.write(self._head(200, b"", False) + (b"" if req.method == "HEAD" else b"bye\n"))
            self._close()
        else:
            self._send(req, 200, b"hello\n")

    # -- writing
    def _head(self, code: int, extra: bytes, keep_alive: bool) -> bytes:
        s = self.s
        head = [_status_line(code), b"X-Upstream: ", s._tag, b"\r\n", extra]
        if not keep_alive:
            head.append(b"Connection: close\r\n")
        elif s.advertise_keepalive and s.keepalive_timeout is not None:
            head.append(b"Keep-Alive: timeout=%s\r\n" % (b"%g" % s.keepalive_timeout))
        head.append(b"\r\n")
        return b"".join(head)

    def _send(self, req: _Request | None, code: int, body: bytes, *, extra: bytes = b"") -> None:
        """A complete response; req None (unparseable request) means close afterwards."""
        keep_alive = req is not None and req.keep_alive
        framing = b"" if code in (204, 304) else b"Content-Length: %d\r\n" % len(body)
        head = self._head(code, framing + extra, keep_alive)
        self.transport.write(head if req is not None and req.method == "HEAD" else head + body)
        self._done(keep_alive)

    def _pump(self) -> None:
        while self.pump is not None and not self.write_paused and not self.closing:
            piece = next(self.pump, None)
            if piece is None:
                self.pump = None
                self._done(self.pump_keep_alive)
                return
            self.transport.write(piece)

    def _done(self, keep_alive: bool) -> None:
        self.busy = False
        self.answered += 1
        if not keep_alive:
            self._close()
        else:
            self._next()

    def _maybe_continue(self) -> None:
        """Expect: 100-continue (RFC 9110 section 10.1.1), only once this request is next in line;
        not from modes that stay silent, nor before a close_after FIN (nothing may be read)."""
        req, s = self.req, self.s
        if (req is not None and req.expect and not self.busy and not self.queue and not self.closing
                and s.mode not in ("hang", "tls")
                and (s.close_after is None or self.answered < s.close_after)):
            req.expect = False
            self.transport.write(_CONTINUE)

    # -- connection control
    def _arm_idle(self) -> None:
        if self.s.keepalive_timeout is not None and not self.closing:
            self._cancel_timer()
            self.timer = self.loop.call_later(self.s.keepalive_timeout, self._close)

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _unthrottle(self) -> None:
        self.read_timer, self.throttled = None, False
        self._sync_reading()

    def _sync_reading(self) -> None:
        if self.closing:
            return
        pause = self.throttled or len(self.queue) >= MAX_QUEUED
        if pause != self.read_paused:
            self.read_paused = pause
            (self.transport.pause_reading if pause else self.transport.resume_reading)()

    def _close(self) -> None:
        """FIN after whatever is buffered has been written."""
        if not self.closing:
            self.closing = True
            self.transport.close()

    def _reset(self) -> None:
        """RST: SO_LINGER on with a zero timeout makes close() discard and reset."""
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.abort()

    def abort(self) -> None:
        self.closing, self.pump = True, None
        self.transport.abort()


class _TLS(asyncio.Protocol):
    """Server-side TLS over one accepted TCP connection (memory BIOs). The _Conn above it is
    created once the handshake completes (as with create_server(ssl=...): a failed handshake
    is not an accepted connection) and sees `_TLSTransport`. A failed handshake sends the
    fatal alert OpenSSL produced, then FIN."""

    def __init__(self, server: FaultServer) -> None:
        self.s, self.loop = server, server._loop
        self.raw: asyncio.Transport | None = None
        self.app: _Conn | None = None
        self.incoming, self.outgoing = _ssl.MemoryBIO(), _ssl.MemoryBIO()
        self.sslobj = server.ssl.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.closing = self.app_paused = self.deliver_scheduled = False

    # -- the TCP side
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.raw = transport  # type: ignore[assignment]
        self.s._conns.add(self)   # until the handshake is done: close() must abort it too

    def connection_lost(self, exc: Exception | None) -> None:
        if self.app is None and not self.closing:   # the client gave up mid-handshake
            self.s.tls_handshake_failures += 1
            self.s.last_tls_error = f"connection lost during the handshake ({exc or 'EOF'})"
        self.closing = True
        self.s._conns.discard(self)
        if self.app is not None:
            self.app.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.app is not None:
            self.app.pause_writing()

    def resume_writing(self) -> None:
        if self.app is not None:
            self.app.resume_writing()

    def eof_received(self) -> bool | None:
        """FIN without close_notify: the app's EOF (it closes), like a plain transport."""
        if self.app is not None and not self.closing:
            self.closing = True
            self.app.eof_received()
        return None   # the raw transport closes itself

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.incoming.write(data)
        if self.app is None:
            try:
                self.sslobj.do_handshake()
            except _ssl.SSLWantReadError:
                self._flush()
                return
            except (_ssl.SSLError, ValueError) as exc:
                self._fail(exc)
                return
            self._flush()
            self.s._conns.discard(self)
            self.app = _Conn(self.s)
            self.app.connection_made(_TLSTransport(self))
        self._deliver()

    def _deliver(self) -> None:
        """Hand decrypted bytes to the app until it pauses, closes, or the BIO is empty."""
        self.deliver_scheduled = False
        while self.app is not None and not self.app_paused and not self.closing:
            try:
                chunk = self.sslobj.read(PIECE)
            except _ssl.SSLWantReadError:
                break
            except _ssl.SSLZeroReturnError:
                chunk = b""
            except _ssl.SSLError as exc:
                self._fail(exc)
                return
            if not chunk:   # close_notify: the client's EOF
                self.app.eof_received()
                self.close()
                break
            self.app.data_received(chunk)
        if not self.closing:
            self._flush()   # TLS 1.3 tickets, key updates

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data and self.raw is not None:
            self.raw.write(data)

    def _fail(self, exc: Exception) -> None:
        """Fatal TLS error: send the alert OpenSSL queued, then FIN; then read and discard
        until the client closes (a close() with unread bytes would RST, and a RST can beat
        the alert to the client)."""
        if self.app is None:
            self.s.tls_handshake_failures += 1
        self.s.last_tls_error = getattr(exc, "reason", None) or str(exc)
        self._flush()
        self.closing = True
        if self.raw.can_write_eof():
            self.raw.write_eof()
        else:
            self.raw.close()

    # -- what _TLSTransport forwards
    def write(self, data: bytes) -> None:
        if self.closing:
            return
        view = memoryview(data)
        while view:
            view = view[self.sslobj.write(view):]
        self._flush()

    def close(self) -> None:
        """close_notify, then FIN after whatever is buffered."""
        if self.closing:
            return
        self.closing = True
        try:
            self.sslobj.unwrap()
        except (_ssl.SSLError, ValueError):
            pass   # SSLWantReadError: the client's close_notify is not awaited
        self._flush()
        self.raw.close()

    def abort(self) -> None:
        self.closing = True
        self.raw.abort()

    def pause_reading(self) -> None:
        self.app_paused = True
        self.raw.pause_reading()

    def resume_reading(self) -> None:
        self.app_paused = False
        if not self.closing:
            self.raw.resume_reading()
            if not self.deliver_scheduled:   # bytes already decrypted-able; never re-enter the app
                self.deliver_scheduled = True
                self.loop.call_soon(self._deliver)


class _TLSTransport(asyncio.Transport):
    """The transport a _Conn sees on a TLS connection."""

    def __init__(self, tls: _TLS) -> None:
        super().__init__()
        self._tls = tls

    def write(self, data: bytes) -> None:
        self._tls.write(data)

    def close(self) -> None:
        self._tls.close()

    def abort(self) -> None:
        self._tls.abort()

    def is_closing(self) -> bool:
        return self._tls.closing

    def pause_reading(self) -> None:
        self._tls.pause_reading()

    def resume_reading(self) -> None:
        self._tls.resume_reading()

    def is_reading(self) -> bool:
        return not self._tls.app_paused

    def get_write_buffer_size(self) -> int:
        return self._tls.raw.get_write_buffer_size()

    def get_extra_info(self, name: str, default=None):
        if name == "ssl_object":
            return self._tls.sslobj
        if name == "peercert":
            return self._tls.sslobj.getpeercert()
        if name == "cipher":
            return self._tls.sslobj.cipher()
        return self._tls.raw.get_extra_info(name, default)


class FaultServer:
    """An upstream that misbehaves in one chosen way; `async with FaultServer("hang") as up:`."""

    def __init__(self, mode: str = "ok", host: str = "127.0.0.1", port: int = 0, *, name: str | None = None,
                 close_after: int | None = None, keepalive_timeout: float | None = None,
                 advertise_keepalive: bool = False, read_rate: int | None = None,
                 seed: int | None = None, ssl: _ssl.SSLContext | None = None) -> None:
        self.mode, self.arg = parse_mode(mode)
        if ssl is not None and self.mode == "tls":
            raise ValueError("fault mode 'tls' imitates a TLS server to plaintext clients; "
                             "with ssl= every mode already speaks TLS")
        self.ssl = ssl                  # server-side context: speak TLS (any mode); url is https://
        self.mode_text = mode
        self.host, self.port, self.name = host, port, name
        self.close_after, self.keepalive_timeout = close_after, keepalive_timeout
        self.advertise_keepalive, self.read_rate = advertise_keepalive, read_rate
        self.rng = random.Random(seed)
        self.requests_seen = self.connections_accepted = 0
        self.last_request: dict | None = None
        self.tls_handshake_failures = 0            # ssl=: handshakes that failed (alert sent)
        self.last_tls_error: str | None = None     # ssl=: OpenSSL's reason, e.g. "TLSV1_ALERT_UNKNOWN_CA"
        self._server: asyncio.AbstractServer | None = None
        self._socks: list[socket.socket] = []   # blackhole: the listener and its fillers
        self._conns: set[_Conn | _TLS] = set()   # _TLS: handshake still in progress
        self._loop: asyncio.AbstractEventLoop | None = None
        self._seen: asyncio.Event | None = None
        self._tag = self._filler = b""

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl is not None else 'http'}://{self.address}"

    def _family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    async def start(self) -> FaultServer:
        self._loop = asyncio.get_running_loop()
        self._seen = asyncio.Event()
        if self.mode == "refuse":
            if self.port == 0:
                # A bound socket that never listens: connects get ECONNREFUSED, and unlike
                # bind-then-close the port stays ours, so a later port-0 bind (the proxy's
                # admin listener, say) cannot be handed this "dead" port.
                s = socket.socket(self._family(), socket.SOCK_STREAM)
                s.bind((self.host, 0))
                self.port = s.getsockname()[1]
                self._socks.append(s)
        elif self.mode == "blackhole":
            await self._start_blackhole()
        else:
            factory = (lambda: _TLS(self)) if self.ssl is not None else (lambda: _Conn(self))
            self._server = await self._loop.create_server(factory, self.host, self.port)
            self.port = self._server.sockets[0].getsockname()[1]
        self._tag = (self.name or self.address).encode("latin-1")
        if self.mode == "huge-header":
            line = b"X-Filler-%05d: " + b"f" * 80 + b"\r\n"
            self._filler = b"".join(line % i for i in range(HUGE_HEAD_BYTES // len(line % 0) + 1))
        return self

    async def _start_blackhole(self) -> None:
        """Listen with backlog 0, never accept, and fill the accept queue ourselves: Linux then
        drops further SYNs (tcp_conn_request: sk_acceptq_is_full), so connects time out."""
        lsock = socket.socket(self._family(), socket.SOCK_STREAM)
        self._socks.append(lsock)
        try:
            lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            lsock.bind((self.host, self.port))
            lsock.listen(0)
            lsock.setblocking(False)
            self.port = lsock.getsockname()[1]
            target = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)   # wildcard: via loopback
            for _ in range(16):
                if _acceptq_full(lsock):
                    return
                filler = socket.socket(self._family(), socket.SOCK_STREAM)
                self._socks.append(filler)
                filler.setblocking(False)
                try:
                    await asyncio.wait_for(self._loop.sock_connect(filler, (target, self.port)), 0.5)
                except TimeoutError:   # no TCP_INFO here: a dropped SYN proves the queue is full
                    filler.close()
                    return
            raise OSError("blackhole: could not fill the accept queue")
        except BaseException:
            for sock in self._socks:
                sock.close()
            self._socks.clear()
            raise

    async def close(self) -> None:
        """Stop listening and abort every live connection; idempotent."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for conn in list(self._conns):
            conn.abort()
        for s in self._socks:
            s.close()
        self._socks.clear()
        if server is not None:
            await server.wait_closed()
        await asyncio.sleep(0)   # let connection_lost callbacks run before the loop may close

    async def wait_requests(self, n: int, timeout: float = 5.0) -> None:
        """Wait until `requests_seen >= n` (fully read requests), or raise TimeoutError."""
        async with asyncio.timeout(timeout):
            while self.requests_seen < n:
                self._seen.clear()
                await self._seen.wait()

    async def __aenter__(self) -> FaultServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not host or int(port) > 65535:
        raise ValueError(f"--listen must be HOST:PORT (got {listen!r})")
    return host.strip("[]"), int(port)


async def _serve(host: str, port: int, mode: str) -> int:
    server = await FaultServer(mode, host, port).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if server.mode == "refuse":
        print(f"gatewise faults: mode={mode} nothing listens on {server.address} "
              "(connections are refused)", flush=True)
    else:
        print(f"gatewise faults: mode={mode} listening on {server.address}", flush=True)
    try:
        await stop.wait()
    finally:
        await server.close()
    return 0


def main_faults(listen: str, mode: str) -> int:
    """`gatewise faults`: serve until SIGINT/SIGTERM; 0 on a clean stop, 2 on bad arguments."""
    try:
        parse_mode(mode)
        host, port = _split_listen(listen)
    except ValueError as exc:
        print(f"gatewise faults: {exc}", file=sys.stderr)
        return 2
    import uvloop   # what `gatewise run` uses

    try:
        return uvloop.run(_serve(host, port, mode))
    except OSError as exc:
        print(f"gatewise faults: cannot listen on {listen}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:   # a signal before the handlers were installed
        return 0
