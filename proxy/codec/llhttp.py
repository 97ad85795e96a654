"""The llhttp adapter (httptools): the default, fast codec.

llhttp 9 is strict by default: it rejects Content-Length with Transfer-Encoding,
duplicate Content-Length, bad chunk sizes, obs-fold and bare CR/LF on its own, so this
adapter adds only what llhttp cannot know: head size limits and HEAD framing.

Two httptools gaps handled here, and two costs avoided:
- httptools buffers a header value internally until it is complete, so a single
  endless header would grow memory; raw bytes seen while in a head are bounded too.
- httptools ignores on_headers_complete's return value, so it cannot be told that the
  response to HEAD has no body (RFC 9110 §9.3.2). The parse is stopped at the head and
  the connection marked not reusable: llhttp would otherwise read the next response as
  this one's body.
- httptools builds the version string with str.format (measured: 1% of the
  instructions per forwarded request, for two calls). A message whose head begins and
  ends in one chunk read from the socket (the common case) has its version read from
  the start line at the start of that chunk, after llhttp has accepted the line; any
  other message asks httptools. The bytes compared end where the accepted start line
  ends (CRLF; "HTTP/1.x SP" for a status line), so a wrong guess at an offset can only
  fail to match and fall back, never read a wrong version.
- The head size limit (the target plus each field with ": " and CRLF) is not counted
  field by field: the bytes of the reads fed since the head began are never fewer, so
  the fields are summed only once those pass the limit, at the end of a read and before
  the head is handed on. A usual head, a few hundred bytes in one read, is never summed.
  Trailers are held to the same limit, on their own: summed at the end of a read while
  they arrive and before they are handed on. Bytes that make no progress outside a head
  (a trailer value or chunk line that never ends, buffered inside httptools) are
  bounded like a head's raw bytes.
"""

from __future__ import annotations

from typing import Any, Final

import httptools

from proxy.codec.base import (CLOSED_REQUEST, CLOSED_RESPONSE, RequestHandler, RequestHead, RequestParser,
                              ResponseHandler, ResponseHead, ResponseParser, fields_size)
from proxy.errors import (BadRequest, RequestHeadersTooLarge, ResponseHeadersTooLarge,
                          UpstreamProtocolError)

_VERSIONS: Final = {"1.1": b"1.1", "1.0": b"1.0"}
# What follows "METHOD SP request-target" in a request line, and how a status line
# begins (RFC 9112 §3, §4): the versions read without asking httptools.
_REQUEST_LINE_ENDS: Final = {b" HTTP/1.1\r\n": b"1.1", b" HTTP/1.0\r\n": b"1.0"}
_STATUS_LINE_STARTS: Final = {b"HTTP/1.1 ": b"1.1", b"HTTP/1.0 ": b"1.0"}
_RAW_SLACK: Final = 256 * 1024  # one large read may carry the end of a head plus body bytes


def _close_delimited(headers: list[tuple[bytes, bytes]]) -> bool:
    """RFC 9112 §6.3: with neither Content-Length (14 bytes) nor Transfer-Encoding (17
    bytes), a response body runs until the close. The length test spares most lower()s."""
    for n, _ in headers:
        if len(n) in (14, 17) and n.lower() in (b"content-length", b"transfer-encoding"):
            return False
    return True


class _HeadOnly(Exception):
    """Stops llhttp after the head of a response to HEAD."""


def _asked_version(p: Any) -> bytes:
    """The version as httptools reads it (the fallback: see the module docstring)."""
    text = p.get_http_version()
    return _VERSIONS.get(text) or text.encode()


def _unwrap(exc: httptools.HttpParserCallbackError) -> BaseException:
    return exc.__context__ if exc.__context__ is not None else exc


class LlhttpRequestParser(RequestParser):
    __slots__ = ("_p", "_h", "_max", "_url", "_headers", "_fed", "_raw", "_pending", "_in_head", "_chunk",
                 "_start")

    def __init__(self, handler: RequestHandler, max_head_bytes: int) -> None:
        self._p: Any = httptools.HttpRequestParser(self)  # None once closed
        self._h: RequestHandler = handler
        self._max = max_head_bytes
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._fed = 0  # length of the read being fed
        self._raw = 0  # bytes of the reads fed since the head began: never less than its size
        self._pending = 0  # bytes fed outside a head since the last message or body event
        self._in_head = False
        self._chunk: bytes | None = None  # being fed, until a message ends in it
        self._start: bytes | None = None  # that chunk, when the current message began it

    def close(self) -> None:
        """The connection is gone (see proxy.codec: close)."""
        self._h = CLOSED_REQUEST
        self._p = None

    def in_head(self) -> bool:
        """Part of a head has been fed, and not its end (see proxy.codec: in_head)."""
        return self._in_head

    def feed(self, data: bytes) -> bytes | None:
        """Parse data; returns the bytes after an upgrade request's head (the start of
        the tunnel), else None."""
        self._fed = n = len(data)
        if self._in_head:
            self._raw += n
        else:
            self._pending += n
        self._chunk = data
        try:
            self._p.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            return data[exc.args[0]:]
        except httptools.HttpParserCallbackError as exc:
            raise _unwrap(exc) from None
        except httptools.HttpParserError as exc:
            raise BadRequest(str(exc)) from None
        finally:
            # a head that continues in the next read asks httptools: no read is kept
            self._chunk = self._start = None
        if self._in_head:
            if self._raw > self._max and (self._raw > self._max + _RAW_SLACK or self._size() > self._max):
                raise RequestHeadersTooLarge(f"request head over {self._max} bytes")
        elif self._pending > self._max + _RAW_SLACK or (self._headers and fields_size(self._headers) > self._max):
            # trailers being received, or a trailer or chunk line that never ends
            raise RequestHeadersTooLarge(f"request trailers over {self._max} bytes")
        return None

    def _size(self) -> int:
        """The head's size so far, as the limit counts it: the target, and each field with
        ": " and CRLF. Asked only when the raw bytes could be over the limit."""
        return len(self._url) + fields_size(self._headers)

    # -- httptools callbacks -----------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._raw = self._fed  # the whole read: where in it the head begins is not known
        self._pending = 0
        self._in_head = True
        self._start = self._chunk

    def on_url(self, url: bytes) -> None:
        url = self._url + url
        self._url = url
        if len(url) > self._max:
            raise RequestHeadersTooLarge(f"request target over {self._max} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        # No size count per field: the head is measured when its raw bytes could be over
        # the limit (feed, on_headers_complete), which is never for the usual small head.
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        p = self._p
        self._in_head = False
        if self._raw > self._max and self._size() > self._max:
            raise RequestHeadersTooLarge(f"request head over {self._max} bytes")
        method = p.get_method()
        version: bytes | None = None
        start, self._start = self._start, None
        if start is not None and start.startswith(method):
            i = len(method) + 1 + len(self._url)
            version = _REQUEST_LINE_ENDS.get(start[i:i + 11])
        if version is None:
            version = _asked_version(p)
        head = RequestHead(method, self._url, version, self._headers, p.should_keep_alive(),
                           p.should_upgrade())
        self._headers = []  # later on_header calls are trailers
        self._h.on_request_head(head)

    def on_body(self, data: bytes) -> None:
        self._pending = 0
        self._h.on_request_body(data)

    def on_message_complete(self) -> None:
        self._chunk = None  # a message that begins after this one does not begin the chunk
        self._pending = 0
        trailers, self._headers = self._headers, []
        if trailers and fields_size(trailers) > self._max:  # (feed checks them only mid-way)
            raise RequestHeadersTooLarge(f"request trailers over {self._max} bytes")
        self._h.on_request_end(trailers)


class LlhttpResponseParser(ResponseParser):
    __slots__ = ("_p", "_h", "_max", "_reason", "_headers", "_raw", "_pending", "_in_head",
                 "_head_only", "_interim", "_in_body", "_final_headers", "_outstanding", "_chunk",
                 "_start")

    def __init__(self, handler: ResponseHandler, max_head_bytes: int) -> None:
        self._p: Any = httptools.HttpResponseParser(self)
        self._h: ResponseHandler = handler
        self._max = max_head_bytes
        self._reason = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._raw = 0  # bytes fed since the request was sent: never less than the head's size
        self._pending = 0  # as in LlhttpRequestParser
        self._in_head = False
        self._head_only = False
        self._interim = False
        self._in_body = False  # the final response has a body that has not ended yet
        self._final_headers: list[tuple[bytes, bytes]] = []  # its fields, for feed_eof
        self._outstanding = False  # a request was sent and its final response has not ended
        self.reusable = True
        self._chunk: bytes | None = None  # as in LlhttpRequestParser
        self._start: bytes | None = None

    def start(self, method: bytes, upgrade: bool = False) -> None:
        """A request was sent; the next response answers it. (llhttp recognises a 101
        on its own, so `upgrade` needs no handling here.)"""
        self._head_only = method == b"HEAD"
        self._outstanding = True
        self._in_head = True
        self._raw = 0

    def close(self) -> None:
        """The connection is gone (see proxy.codec: close)."""
        self._h = CLOSED_RESPONSE
        self._p = None

    def feed(self, data: bytes) -> bytes | None:
        """Parse data; returns the bytes after a 101 response's head, else None."""
        if self._in_head:
            self._raw += len(data)
        else:
            self._pending += len(data)
        self._chunk = data
        try:
            self._p.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            return data[exc.args[0]:]
        except httptools.HttpParserCallbackError as exc:
            inner = _unwrap(exc)
            if isinstance(inner, _HeadOnly):
                return None
            self.reusable = False
            if inner is exc:  # llhttp itself refused (its state is poisoned by an earlier error)
                raise UpstreamProtocolError(f"invalid response: {exc}") from None
            raise inner from None  # ours: a typed ProxyError, or a bug that must stay visible
        except httptools.HttpParserError as exc:
            self.reusable = False
            raise UpstreamProtocolError(f"invalid response: {exc}") from None
        finally:
            self._chunk = self._start = None  # as in LlhttpRequestParser.feed
        if self._in_head:
            if self._raw > self._max and (self._raw > self._max + _RAW_SLACK or fields_size(self._headers) > self._max):
                self.reusable = False
                raise ResponseHeadersTooLarge(f"response head over {self._max} bytes")
        elif self._pending > self._max + _RAW_SLACK or (self._headers and fields_size(self._headers) > self._max):
            # trailers being received, or a trailer or chunk line that never ends
            self.reusable = False
            raise ResponseHeadersTooLarge(f"response trailers over {self._max} bytes")
        return None

    def feed_eof(self) -> bool:
        """The upstream closed. True when that ends a close-delimited body (RFC 9112 §6.3
        rule 8); the caller treats any other EOF as a failure."""
        self.reusable = False
        if self._in_body and _close_delimited(self._final_headers):
            self._in_body = False
            self._outstanding = False
            self._h.on_response_end([])
            return True
        return False

    # -- httptools callbacks -----------------------------------------------------------
    def on_message_begin(self) -> None:
        if not self._outstanding:  # bytes after a complete response: never ours to relay
            self.reusable = False
            raise UpstreamProtocolError("response bytes with no request outstanding")
        self._reason = b""
        self._headers = []
        self._pending = 0
        self._in_head = True
        self._start = self._chunk

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))  # measured as in LlhttpRequestParser

    def on_headers_complete(self) -> None:
        p = self._p
        if self._raw > self._max and fields_size(self._headers) > self._max:
            self.reusable = False
            raise ResponseHeadersTooLarge(f"response head over {self._max} bytes")
        status = p.get_status_code()
        self._in_head = False
        headers, self._headers = self._headers, []
        self._interim = status < 200
        if not p.should_keep_alive():
            self.reusable = False
        start, self._start = self._start, None
        version = _STATUS_LINE_STARTS.get(start[:9]) if start is not None else None
        if version is None:
            version = _asked_version(p)
        head = ResponseHead(status, self._reason, version, headers)
        if self._interim:
            self._in_head = True  # the final response head follows
            self._h.on_response_head(head)
            return
        # Whether the body is delimited by the close is only asked at EOF (feed_eof).
        self._in_body = not (self._head_only or status in (204, 304))
        self._final_headers = headers
        self._h.on_response_head(head)
        if self._head_only:
            self.reusable = False  # before on_response_end, which decides about pooling
            self._outstanding = False
            self._h.on_response_end([])
            raise _HeadOnly

    def on_body(self, data: bytes) -> None:
        self._pending = 0
        self._h.on_response_body(data)

    def on_message_complete(self) -> None:
        self._chunk = None  # as in LlhttpRequestParser
        self._pending = 0
        if self._interim:
            self._interim = False
            return
        self._in_body = False
        self._outstanding = False
        trailers, self._headers = self._headers, []
        if trailers and fields_size(trailers) > self._max:  # (feed checks them only mid-way)
            self.reusable = False
            raise ResponseHeadersTooLarge(f"response trailers over {self._max} bytes")
        self._h.on_response_end(trailers)
