"""Pure header rewriting for both directions (no I/O).

Rules (RFC 9110 §7.6.1, RFC 9112 §6-7):
- Hop-by-hop fields are removed: Connection, Keep-Alive, Proxy-Connection, TE, Trailer,
  Transfer-Encoding (gatewise re-frames every body), Upgrade (unless tunnelling), and
  every field named in Connection.
- Framing is decided here, once: the outbound head carries exactly one of
  Content-Length or Transfer-Encoding: chunked, or neither when there is no body.
- Requests gain X-Forwarded-For (appended), X-Forwarded-Proto and X-Forwarded-Host
  (set), Via (appended, §7.6.3) and X-Request-Id. Host is kept as the client sent it.
- Responses gain Via and X-Request-Id; a 5xx from the upstream also gains a Proxy-Status
  member with received-status, so it is never mistaken for one gatewise made (RFC 9209 §2).
"""

from __future__ import annotations

import os
import random
import re
import time
from email.utils import formatdate
from http import HTTPStatus

from proxy.codec.base import Headers, RequestHead, ResponseHead

HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                        b"transfer-encoding", b"upgrade"})
# A request id from the client is kept only when it is short and harmless to log and echo.
_SANE_ID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")
_NO_BODY_STATUS = frozenset({204, 304})

# Body framing of an outbound message.
NO_BODY, LENGTH, CHUNKED, UNTIL_CLOSE = 0, 1, 2, 3


# Request ids must be unique, not secret: a PRNG seeded once from the OS gives 96 random
# bits per id without a getrandom() syscall per request.
_ids = random.Random(os.urandom(16))


def new_request_id() -> str:
    return "%024x" % _ids.getrandbits(96)


def _connection_tokens(headers: Headers) -> set[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        # the length test first: most names are not 10 bytes, so most are never lowercased
        if len(name) == 10 and name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    return tokens


class RequestInfo:
    """What the forwarding logic needs to know about a request, from one header scan."""

    __slots__ = ("host", "request_id", "framing", "content_length", "idempotent", "looped", "accept",
                 "te_trailers", "problem")

    def __init__(self) -> None:
        self.host: bytes | None = None
        self.request_id = ""
        self.framing = NO_BODY
        self.content_length = 0
        self.idempotent = False
        self.looped = False
        self.accept: bytes | None = None
        self.te_trailers = False
        self.problem: str | None = None  # why the request must be refused with 400


# RFC 9110 §9.2.2: idempotent methods may be retried after a partial failure.
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


def scan_request(head: RequestHead, proxy_name: bytes) -> RequestInfo:
    info = RequestInfo()
    info.idempotent = head.method in IDEMPOTENT
    hosts = 0
    for name, value in head.headers:
        lname = name.lower()
        if lname == b"host":
            info.host = value
            hosts += 1
        elif lname == b"content-length":
            if info.framing != CHUNKED:  # the codecs reject CL with TE; never trust order
                info.framing = LENGTH
                info.content_length = int(value)
        elif lname == b"transfer-encoding":
            info.framing = CHUNKED  # the codec has rejected anything but "..., chunked"
            if value.strip().lower() != b"chunked":
                # RFC 9112 §6.1: a coding we do not implement (gzip, chunked) cannot be
                # re-framed without changing the body; refuse rather than forward it wrong.
                info.problem = "unsupported transfer coding: " + value.decode("latin-1")
        elif lname == b"x-request-id":
            if _SANE_ID.fullmatch(value):
                info.request_id = value.decode()
        elif lname == b"via":
            info.looped = info.looped or _via_names(value, proxy_name)
        elif lname == b"accept":
            info.accept = value
        elif lname == b"te":
            info.te_trailers = b"trailers" in value.lower()
    if info.framing == LENGTH and info.content_length == 0:
        info.framing = NO_BODY
    # RFC 9112 §3.2: exactly one Host in HTTP/1.1, at most one in 1.0, else 400.
    if hosts > 1:
        info.problem = "more than one Host header"
    elif hosts == 0 and head.version == b"1.1":
        info.problem = "HTTP/1.1 request without a Host header"
    if head.version not in (b"1.1", b"1.0"):
        # RFC 9110 §6.2: gatewise speaks HTTP/1.x only; HTTP/0.9 has no head to forward.
        info.problem = "unsupported HTTP version " + head.version.decode("latin-1")
    if head.method == b"CONNECT":
        info.problem = "CONNECT is not supported: gatewise is a reverse proxy"
    if not info.request_id:
        info.request_id = new_request_id()
    return info


def _via_names(value: bytes, proxy_name: bytes) -> bool:
    """True when a Via field value lists proxy_name as a received-by (RFC 9110 §7.6.3)."""
    for element in value.split(b","):
        parts = element.split()
        if len(parts) >= 2 and parts[1].lower() == proxy_name:
            return True
    return False


def build_request_head(head: RequestHead, info: RequestInfo, *, target: bytes, client_ip: bytes,
                       proto: bytes, via: bytes) -> bytes:
    """The head gatewise sends upstream. `via` is b"1.1 gatewise"."""
    drop = _connection_tokens(head.headers) | HOP_BY_HOP
    tunnel = head.upgrade
    out = [head.method, b" ", target, b" HTTP/1.1\r\n"]
    xff = via_seen = None
    for name, value in head.headers:
        lname = name.lower()
        if lname in drop:
            if tunnel and lname == b"upgrade":
                out += (name, b": ", value, b"\r\n")
            continue
        if lname == b"x-forwarded-for":
            xff = value if xff is None else xff + b", " + value
        elif lname == b"via":
            via_seen = value if via_seen is None else via_seen + b", " + value
        elif lname in (b"x-forwarded-proto", b"x-forwarded-host", b"x-request-id",
                       b"content-length"):
            continue  # replaced below
        else:
            out += (name, b": ", value, b"\r\n")
    if info.framing == LENGTH:
        out += (b"Content-Length: ", str(info.content_length).encode(), b"\r\n")
    elif info.framing == CHUNKED:
        out.append(b"Transfer-Encoding: chunked\r\n")
    if tunnel:
        out.append(b"Connection: upgrade\r\n")
    elif info.te_trailers:
        out.append(b"TE: trailers\r\nConnection: TE\r\n")
    out += (b"X-Forwarded-For: ", client_ip if xff is None else xff + b", " + client_ip, b"\r\n",
            b"X-Forwarded-Proto: ", proto, b"\r\n")
    if info.host is not None:
        out += (b"X-Forwarded-Host: ", info.host, b"\r\n")
    out += (b"Via: ", via if via_seen is None else via_seen + b", " + via, b"\r\n",
            b"X-Request-Id: ", info.request_id.encode(), b"\r\n\r\n")
    return b"".join(out)


class ResponsePlan:
    """How the response goes back to the client, decided from one scan of its head."""

    __slots__ = ("head", "framing", "keep_alive", "upstream_keep_alive", "keepalive_timeout", "problem")

    def __init__(self) -> None:
        self.head = b""
        self.framing = NO_BODY
        self.keep_alive = True            # the client connection stays open afterwards
        self.upstream_keep_alive = True   # the upstream said it may be reused
        self.keepalive_timeout: float | None = None  # from the upstream's Keep-Alive: timeout=
        self.problem: str | None = None  # why this response cannot be forwarded


_STATUS_LINES: dict[int, bytes] = {}


def status_line(status: int, reason: bytes = b"") -> bytes:
    """b"HTTP/1.1 502 Bad Gateway\r\n"; lines with the standard reason are built once."""
    if reason:
        return b"HTTP/1.1 %d %s\r\n" % (status, reason)
    line = _STATUS_LINES.get(status)
    if line is None:
        try:
            phrase = HTTPStatus(status).phrase.encode()
        except ValueError:
            phrase = b"Unknown"
        line = _STATUS_LINES[status] = b"HTTP/1.1 %d %s\r\n" % (status, phrase)
    return line


def plan_response(head: ResponseHead, *, request_method: bytes, client_version: bytes,
                  client_keep_alive: bool, request_id: bytes, via: bytes,
                  proxy_status: bytes | None) -> ResponsePlan:
    """Rewrite an upstream response head for the client.

    `proxy_status` is our Proxy-Status member for a forwarded 5xx (None otherwise).
    Interim (1xx) heads are passed with hop-by-hop fields removed and no framing."""
    plan = ResponsePlan()
    drop = _connection_tokens(head.headers)
    if b"close" in drop or (head.version == b"1.0" and b"keep-alive" not in drop):
        plan.upstream_keep_alive = False
    drop |= HOP_BY_HOP
    status = head.status
    interim = status < 200
    length = None
    chunked = False
    via_seen = None
    date_seen = False
    out = [status_line(status, head.reason)]
    for name, value in head.headers:
        lname = name.lower()
        if lname == b"content-length":
            length = value
            continue
        if lname == b"transfer-encoding":
            chunked = True
            if value.strip().lower() != b"chunked":
                # RFC 9112 §6.1: re-framing would drop the other coding and hand the
                # client a body it cannot decode (RFC 9209 §2.3.24).
                plan.problem = "unsupported transfer coding: " + value.decode("latin-1")
            continue
        if lname == b"keep-alive":
            plan.keepalive_timeout = _keepalive_timeout(value)
            continue
        if lname in drop:
            if status == 101 and lname == b"upgrade":
                out += (name, b": ", value, b"\r\n")
            continue
        if lname == b"via":
            via_seen = value if via_seen is None else via_seen + b", " + value
        elif lname == b"x-request-id":
            continue
        else:
            if lname == b"date":
                date_seen = True
            out += (name, b": ", value, b"\r\n")
    out += (b"Via: ", via if via_seen is None else via_seen + b", " + via, b"\r\n")
    if not date_seen and not interim:
        # RFC 9110 §6.6.1: a recipient with a clock MUST add Date to a response it forwards
        # without one
        out.append(date_field())
    if interim:
        if status == 101:
            out.append(b"Connection: upgrade\r\n")
        out.append(b"\r\n")
        plan.head = b"".join(out)
        plan.framing = NO_BODY
        return plan
    keep_alive = client_keep_alive
    if request_method == b"HEAD" or status in _NO_BODY_STATUS:
        plan.framing = NO_BODY
        if length is not None:  # describes the representation, not this message (§8.6)
            out += (b"Content-Length: ", length, b"\r\n")
    elif chunked:
        plan.framing = CHUNKED
    elif length is not None:
        plan.framing = LENGTH
        out += (b"Content-Length: ", length, b"\r\n")
    else:
        plan.framing = UNTIL_CLOSE
        plan.upstream_keep_alive = False
    if plan.framing in (CHUNKED, UNTIL_CLOSE):
        if client_version == b"1.1":
            plan.framing = CHUNKED
            out.append(b"Transfer-Encoding: chunked\r\n")
        else:  # an HTTP/1.0 client cannot read chunked: delimit by closing (RFC 9112 §6.3)
            plan.framing = UNTIL_CLOSE
            keep_alive = False
    if proxy_status is not None:
        out += (b"Proxy-Status: ", proxy_status, b"\r\n")
    out += (b"X-Request-Id: ", request_id, b"\r\n")
    if not keep_alive:
        out.append(b"Connection: close\r\n")
    elif client_version == b"1.0":
        out.append(b"Connection: keep-alive\r\n")
    out.append(b"\r\n")
    plan.keep_alive = keep_alive
    plan.head = b"".join(out)
    return plan


def _keepalive_timeout(value: bytes) -> float | None:
    for param in value.split(b","):
        key, _, val = param.strip().partition(b"=")
        if key.strip().lower() == b"timeout":
            try:
                return float(val.strip().strip(b'"'))
            except ValueError:
                return None
    return None


_date_second = -1
_date_field = b""


def date_field() -> bytes:
    """b"Date: <IMF-fixdate>\r\n", rebuilt at most once a second (uvicorn's on_tick idea)."""
    global _date_second, _date_field
    now = int(time.time())
    if now != _date_second:
        _date_second = now
        _date_field = b"Date: " + formatdate(now, usegmt=True).encode() + b"\r\n"
    return _date_field


def trailer_block(trailers: Headers) -> bytes:
    """The end of a chunked body, with trailers (RFC 9112 §7.1.2), minus hop-by-hop ones."""
    if not trailers:
        return b"0\r\n\r\n"
    out = [b"0\r\n"]
    for name, value in trailers:
        if name.lower() not in HOP_BY_HOP:
            out += (name, b": ", value, b"\r\n")
    out.append(b"\r\n")
    return b"".join(out)
