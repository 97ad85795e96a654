"""The h11 adapter: the strict reference codec (`parser = "h11"`).

h11 keeps state for both directions of a connection and expects to write the replies
itself; gatewise frames its own output, so this adapter uses one h11.Connection per
message and carries any unparsed bytes (pipelined requests) into the next one.

h11 accepts obs-fold (it unfolds) and bare-LF line endings; a proxy must not (RFC 9112
§5.2, §2.2), so heads are checked byte-for-byte before h11 sees them.
"""

from __future__ import annotations

import h11

from proxy.codec.base import (CLOSED_REQUEST, CLOSED_RESPONSE, RequestHandler, RequestHead, RequestParser,
                              ResponseHandler, ResponseHead, ResponseParser, check_head_bytes, fields_size, head_end)
from proxy.errors import (BadRequest, RequestHeadersTooLarge, ResponseHeadersTooLarge,
                          UnsupportedTransferCoding, UpstreamProtocolError)


def _tokens(headers, name: bytes) -> set[bytes]:
    out: set[bytes] = set()
    for n, v in headers:
        if n.lower() == name:
            out.update(t.strip().lower() for t in v.split(b","))
    return out


def _keep_alive(version: bytes, headers) -> bool:
    tokens = _tokens(headers, b"connection")
    if b"close" in tokens:
        return False
    return version == b"1.1" or b"keep-alive" in tokens


def _check_transfer_coding(head: bytes) -> None:
    """h11 refuses a transfer coding other than chunked with a generic protocol error;
    name it the way the llhttp path does (RFC 9209 §2.3.24)."""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"transfer-encoding" and value.strip().lower() != b"chunked":
            raise UnsupportedTransferCoding("unsupported transfer coding: " + value.strip().decode("latin-1"))


class H11RequestParser(RequestParser):
    __slots__ = ("_h", "_max", "_conn", "_head_buf", "_upgrade")

    def __init__(self, handler: RequestHandler, max_head_bytes: int) -> None:
        self._h: RequestHandler = handler
        self._max = max_head_bytes
        self._conn: h11.Connection | None = None
        self._head_buf = bytearray()
        self._upgrade = False

    def close(self) -> None:
        """The connection is gone (see proxy.codec: close)."""
        self._h = CLOSED_REQUEST

    def in_head(self) -> bool:
        """Part of a head has been fed, and not its end (see proxy.codec: in_head)."""
        # (a head is checked whole before h11 sees it: until then it waits in _head_buf;
        # the empty lines before one are not part of it, RFC 9112 §2.2)
        return self._conn is None and bool(self._head_buf.lstrip(b"\r\n"))

    def feed(self, data: bytes) -> bytes | None:
        while True:
            if self._conn is None:  # waiting for a head: check it raw first
                self._head_buf += data
                data = b""
                buf = self._head_buf.lstrip(b"\r\n")  # RFC 9112 §2.2: ignore leading empty lines
                end = head_end(buf)
                if end == -1:
                    if len(buf) > self._max:
                        raise RequestHeadersTooLarge(f"request head over {self._max} bytes")
                    return None
                if end > self._max:
                    raise RequestHeadersTooLarge(f"request head over {self._max} bytes")
                if why := check_head_bytes(buf[:end]):
                    raise BadRequest(why)
                self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self._max)
                data, self._head_buf = bytes(buf), bytearray()
            conn = self._conn
            try:
                conn.receive_data(data)
                while True:
                    ev = conn.next_event()
                    if ev is h11.NEED_DATA:
                        return None
                    if isinstance(ev, h11.Request):
                        headers = list(ev.headers.raw_items())
                        names = {n.lower() for n, _ in headers}
                        if b"content-length" in names and b"transfer-encoding" in names:
                            # h11 lets Transfer-Encoding win (RFC 9112 §6.3 allows it); a
                            # proxy must not, or the next hop may frame it differently.
                            raise BadRequest("Content-Length together with Transfer-Encoding")
                        version = ev.http_version
                        self._upgrade = (b"upgrade" in _tokens(headers, b"connection")
                                         and any(n.lower() == b"upgrade" for n, _ in headers))
                        self._h.on_request_head(RequestHead(ev.method, ev.target, version, headers,
                                                            _keep_alive(version, headers), self._upgrade))
                    elif isinstance(ev, h11.Data):
                        self._h.on_request_body(bytes(ev.data))
                    elif isinstance(ev, h11.EndOfMessage):
                        trailers = list(ev.headers.raw_items())
                        # h11 bounds only what it has not parsed yet: trailers that come
                        # whole are held to the limit here
                        if trailers and fields_size(trailers) > self._max:
                            raise RequestHeadersTooLarge(f"request trailers over {self._max} bytes")
                        self._h.on_request_end(trailers)
                        rest = conn.trailing_data[0]
                        self._conn = None
                        if self._upgrade:
                            return bytes(rest)
                        data = bytes(rest)
                        break
                    else:  # PAUSED or ConnectionClosed cannot happen before EndOfMessage
                        return None
            except h11.RemoteProtocolError as exc:
                if exc.error_status_hint == 431:
                    raise RequestHeadersTooLarge(str(exc)) from None
                raise BadRequest(str(exc)) from None
            if not data:
                return None


class H11ResponseParser(ResponseParser):
    __slots__ = ("_h", "_max", "_conn", "_head_buf", "_head_checked")

    def __init__(self, handler: ResponseHandler, max_head_bytes: int) -> None:
        self._h: ResponseHandler = handler
        self._max = max_head_bytes
        self._conn: h11.Connection | None = None
        self._head_buf = bytearray()
        self._head_checked = False
        self.reusable = True

    def start(self, method: bytes, upgrade: bool = False) -> None:
        # Tell h11 what was asked, so it frames the answer (HEAD, RFC 9110 §9.3.2) and
        # accepts a 101 to an Upgrade. The request itself was written by gatewise.
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=self._max)
        headers = [("Host", "upstream"), ("Content-Length", "0")]
        if upgrade:
            headers += [("Connection", "upgrade"), ("Upgrade", "proxied")]
        conn.send(h11.Request(method=method, target="/", headers=headers))
        conn.send(h11.EndOfMessage())
        self._conn = conn
        self._head_buf = bytearray()
        self._head_checked = False

    def close(self) -> None:
        """The connection is gone (see proxy.codec: close)."""
        self._h = CLOSED_RESPONSE

    def feed(self, data: bytes) -> bytes | None:
        conn = self._conn
        if conn is None:
            self.reusable = False
            raise UpstreamProtocolError("response bytes with no request outstanding")
        if not self._head_checked:
            self._check_heads(data)
        try:
            conn.receive_data(data)
            return self._drain(conn)
        except h11.RemoteProtocolError as exc:
            self.reusable = False
            if exc.error_status_hint == 431 or "buffer" in str(exc):
                raise ResponseHeadersTooLarge(f"response head over {self._max} bytes") from None
            raise UpstreamProtocolError(f"invalid response: {exc}") from None

    def _check_heads(self, data: bytes) -> None:
        """Check raw bytes of every head up to the final one (1xx heads may precede it in
        the same read) before h11 sees them."""
        buf = self._head_buf
        buf += data
        while True:
            end = head_end(buf)
            if end == -1:
                if len(buf) > self._max:
                    self.reusable = False
                    raise ResponseHeadersTooLarge(f"response head over {self._max} bytes")
                return
            if why := check_head_bytes(buf[:end]):
                self.reusable = False
                raise UpstreamProtocolError(why)
            interim = buf[9:10] == b"1"  # "HTTP/1.1 1xx": another head follows
            if not interim:
                _check_transfer_coding(bytes(buf[:end]))
            del buf[:end]
            if not interim:
                self._head_checked = True
                self._head_buf = bytearray()
                return

    def feed_eof(self) -> bool:
        self.reusable = False
        conn = self._conn
        if conn is None or conn.their_state is not h11.SEND_BODY:
            return False
        try:
            conn.receive_data(b"")
            self._drain(conn)
        except h11.RemoteProtocolError:
            return False
        return self._conn is None

    def _drain(self, conn: h11.Connection) -> bytes | None:
        while True:
            ev = conn.next_event()
            if ev is h11.NEED_DATA or ev is h11.PAUSED:
                if conn.their_state is h11.SWITCHED_PROTOCOL:
                    self._conn = None
                    self.reusable = False
                    return bytes(conn.trailing_data[0])
                return None
            if isinstance(ev, h11.InformationalResponse):
                headers = list(ev.headers.raw_items())
                self._h.on_response_head(ResponseHead(ev.status_code, ev.reason, ev.http_version, headers))
                if ev.status_code == 101:
                    self._conn = None
                    self.reusable = False
                    return bytes(conn.trailing_data[0])
            elif isinstance(ev, h11.Response):
                headers = list(ev.headers.raw_items())
                if not _keep_alive(ev.http_version, headers):
                    self.reusable = False
                self._h.on_response_head(ResponseHead(ev.status_code, ev.reason, ev.http_version, headers))
            elif isinstance(ev, h11.Data):
                self._h.on_response_body(bytes(ev.data))
            elif isinstance(ev, h11.EndOfMessage):
                self._conn = None
                if conn.trailing_data[0]:
                    self.reusable = False  # bytes beyond the response: never reuse
                trailers = list(ev.headers.raw_items())
                if trailers and fields_size(trailers) > self._max:  # as for requests
                    self.reusable = False
                    raise ResponseHeadersTooLarge(f"response trailers over {self._max} bytes")
                self._h.on_response_end(trailers)
                return None
            elif isinstance(ev, h11.ConnectionClosed):
                return None
