"""Message heads shared by both codec adapters, and the checks llhttp and h11 disagree on."""

from __future__ import annotations

from proxy.compiled import mypyc_attr

Headers = list[tuple[bytes, bytes]]


class RequestHead:
    """A parsed request head. Header names keep the client's case; values are raw bytes.

    The codec fills the first six slots; headers.scan_request fills the rest from one
    pass over the fields (one object per request, not a head and a scan result)."""

    __slots__ = ("method", "target", "version", "headers", "keep_alive", "upgrade",
                 # set by headers.scan_request
                 "host", "framing", "content_length", "idempotent", "looped", "accept", "te_trailers",
                 "problem", "fields", "xff", "via_seen", "request_id_bytes")

    # (declared for the type checker and for mypyc, which compiles this class: see setup.py)
    host: bytes | None
    framing: int
    content_length: int
    idempotent: bool
    looped: bool
    accept: bytes | None
    te_trailers: bool
    problem: str | None
    fields: list[bytes]
    xff: bytes | None
    via_seen: bytes | None
    request_id_bytes: bytes

    def __init__(self, method: bytes, target: bytes, version: bytes, headers: Headers,
                 keep_alive: bool, upgrade: bool) -> None:
        self.method = method        # b"GET"
        self.target = target        # b"/path?q" (or absolute-form, RFC 9112 §3.2.2)
        self.version = version      # b"1.1" or b"1.0"
        self.headers = headers
        self.keep_alive = keep_alive
        self.upgrade = upgrade      # Connection: upgrade + Upgrade present (RFC 9110 §7.8)

    @property
    def request_id(self) -> str:
        """The id as text, for logs and the recorder (heads use request_id_bytes)."""
        return self.request_id_bytes.decode()


class ResponseHead:
    """A parsed response head. The codec fills the first four slots; headers.plan_response
    fills the rest (how the response goes on to the client), as with RequestHead."""

    __slots__ = ("status", "reason", "version", "headers",
                 # set by headers.plan_response
                 "rewritten",            # the head for the client (bytes)
                 "framing",              # of the body for the client (headers.NO_BODY...)
                 "keep_alive",           # the client connection stays open afterwards
                 "upstream_keep_alive",  # the upstream said its connection may be reused
                 "keepalive_timeout",    # from the upstream's Keep-Alive: timeout= (or None)
                 "problem")              # why this response cannot be forwarded (or None)

    rewritten: bytes
    framing: int
    keep_alive: bool
    upstream_keep_alive: bool
    keepalive_timeout: float | None
    problem: str | None

    def __init__(self, status: int, reason: bytes, version: bytes, headers: Headers) -> None:
        self.status = status
        self.reason = reason
        self.version = version
        self.headers = headers


# What a parser delivers its events to (see proxy.codec). Base classes rather than
# Protocols: compiled, a parser's call through a base class is a direct (vtable) call, not a
# Python method call by name; a parser makes five of them per forwarded request.
# Interpreted subclasses (the tests' recorders) work too: mypyc's glue makes their calls
# Python calls, as before.

@mypyc_attr(allow_interpreted_subclasses=True)
class RequestHandler:
    __slots__ = ()

    def on_request_head(self, head: RequestHead) -> None:
        raise NotImplementedError

    def on_request_body(self, data: bytes) -> None:
        raise NotImplementedError

    def on_request_end(self, trailers: Headers) -> None:
        raise NotImplementedError


@mypyc_attr(allow_interpreted_subclasses=True)
class ResponseHandler:
    __slots__ = ()

    def on_response_head(self, head: ResponseHead) -> None:
        raise NotImplementedError

    def on_response_body(self, data: bytes) -> None:
        raise NotImplementedError

    def on_response_end(self, trailers: Headers) -> None:
        raise NotImplementedError


# The parsers' own shape, for their owners (downstream.py, upstream_conn.py): base classes
# for the same reason. The llhttp adapter is compiled, the h11 one an interpreted subclass.

@mypyc_attr(allow_interpreted_subclasses=True)
class RequestParser:
    __slots__ = ()

    def feed(self, data: bytes) -> bytes | None:
        """Parse data; returns the bytes after an upgrade request's head (the start of
        the tunnel), else None."""
        raise NotImplementedError

    def in_head(self) -> bool:
        """Part of a head has been fed, and not its end."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


@mypyc_attr(allow_interpreted_subclasses=True)
class ResponseParser:
    __slots__ = ("reusable",)

    reusable: bool  # False once this connection cannot carry another exchange

    def start(self, method: bytes, upgrade: bool = False) -> None:
        """A request was sent; the next response answers it."""
        raise NotImplementedError

    def feed(self, data: bytes) -> bytes | None:
        """Parse data; returns the bytes after a 101 response's head, else None."""
        raise NotImplementedError

    def feed_eof(self) -> bool:
        """The upstream closed. True when that ends a close-delimited body (RFC 9112 §6.3
        rule 8); the caller treats any other EOF as a failure."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


# What a closed parser holds instead of its handler: nothing to keep alive, and a late
# event is an error, not a call into a connection that is gone.
CLOSED_REQUEST: RequestHandler = RequestHandler()
CLOSED_RESPONSE: ResponseHandler = ResponseHandler()


def fields_size(fields: Headers) -> int:
    """Fields as the head and trailer limits count them: each with ": " and CRLF."""
    return sum(len(n) + len(v) + 4 for n, v in fields)


def head_end(buf: bytes | bytearray) -> int:
    """Index just past the blank line ending a head, or -1. Accepts bare-LF endings so
    that check_head_bytes can reject them with a precise message."""
    i = buf.find(b"\r\n\r\n")
    j = buf.find(b"\n\n")
    if j != -1 and (i == -1 or j < i):
        return j + 2
    return -1 if i == -1 else i + 4


def check_head_bytes(head: bytes | bytearray) -> str | None:
    """Why this raw head must be rejected, or None. h11 accepts obs-fold (it unfolds) and
    bare LF line endings; RFC 9112 §5.2 lets a server reject obs-fold and §2.2 lets it
    reject bare CR, and a proxy must, or it forwards a message the next hop may frame
    differently (request smuggling). llhttp rejects these on its own."""
    if b"\r" in head.replace(b"\r\n", b""):
        return "bare CR in message head"
    if head.count(b"\n") != head.count(b"\r\n"):
        return "bare LF in message head (lines must end with CRLF)"
    if b"\n " in head or b"\n\t" in head:
        return "obsolete line folding (obs-fold) in message head"
    return None
