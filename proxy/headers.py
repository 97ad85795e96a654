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
import re
import time
from binascii import hexlify
from collections.abc import Set
from email.utils import formatdate
from http import HTTPStatus
from typing import Final

from proxy.codec.base import Headers, RequestHead, ResponseHead

HOP_BY_HOP: Final = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                               b"transfer-encoding", b"upgrade"})
# A request id from the client is kept only when it is short and harmless to log and echo.
_SANE_ID: Final = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")
_NO_BODY_STATUS: Final = frozenset({204, 304})

# Body framing of an outbound message. (Final, here and below: mypyc compiles the value
# into the code that reads it, instead of a module dict lookup per use.)
NO_BODY: Final = 0
LENGTH: Final = 1
CHUNKED: Final = 2
UNTIL_CLOSE: Final = 3


_hexlify: Final = hexlify  # (Final: C statics in the compiled module, no lookup per call)
_ID_BYTES: Final = 12  # 96 bits, 24 hex digits
_IDS_PER_BLOCK: Final = 256


class _RequestIds:
    """Request ids: 96 random bits each, as 24 lowercase hex digits. They must be unique,
    not secret, and are made for every request: each is a slice of a block of OS
    randomness hexlified at once (one getrandom() and one hexlify per 256 ids), not a
    PRNG call, an int and two conversions per request (measured: 1,709 instructions per
    id, compiled; a slice is about 150)."""

    __slots__ = ("_block", "_at")

    def __init__(self) -> None:
        self._block = b""
        self._at = 0

    def next(self) -> bytes:
        at = self._at
        if at >= len(self._block):
            self._block = _hexlify(os.urandom(_ID_BYTES * _IDS_PER_BLOCK))
            at = 0
        end = at + 2 * _ID_BYTES
        self._at = end
        return self._block[at:end]

    def forget(self) -> None:
        """A forked child must not hand out its parent's remaining ids."""
        self._block = b""
        self._at = 0


_ids: Final = _RequestIds()
os.register_at_fork(after_in_child=_ids.forget)


def new_request_id_bytes() -> bytes:
    return _ids.next()


def new_request_id() -> str:
    return new_request_id_bytes().decode()


def _tokens(value: bytes) -> list[bytes]:
    """The lowercased tokens of a Connection field value."""
    return [t.strip().lower() for t in value.split(b",")]


def _names_any(headers: Headers, names: Set[bytes]) -> bool:
    """True when a field of `headers` is named in `names` (lowercased)."""
    return any(name.lower() in names for name, _ in headers)


# RFC 9110 §9.2.2: idempotent methods may be retried after a partial failure.
IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})

# What a request field is to gatewise, by lowercased name: one dict lookup per field
# instead of a chain of comparisons. Anything not listed is forwarded unchanged.
_KEEP: Final = 0
_HOST: Final = 1
_ACCEPT: Final = 2
_LENGTH: Final = 3
_CODING: Final = 4
_REQUEST_ID: Final = 5
_VIA: Final = 6
_XFF: Final = 7
_TE: Final = 8
_CONNECTION: Final = 9
_UPGRADE: Final = 10
_DROP: Final = 11
_REQUEST_FIELDS: Final = {
    b"host": _HOST, b"accept": _ACCEPT, b"content-length": _LENGTH, b"transfer-encoding": _CODING,
    b"x-request-id": _REQUEST_ID, b"via": _VIA, b"x-forwarded-for": _XFF, b"te": _TE,
    b"connection": _CONNECTION, b"upgrade": _UPGRADE,
    # hop-by-hop, or set by gatewise
    b"keep-alive": _DROP, b"proxy-connection": _DROP, b"trailer": _DROP,
    b"x-forwarded-proto": _DROP, b"x-forwarded-host": _DROP,
}
_NOTHING: Final[frozenset[bytes]] = frozenset()

# A field name's kind by its exact spelling, learned as names are seen: a peer spells its
# fields the same way every time, so a field costs one dict lookup and no lower(). Bounded
# (at most _LEARN_MAX names of at most _LEARN_NAME_MAX bytes: 32 KiB): past that, a peer
# inventing names gets the lower() path, unlearned.
_LEARN_MAX = 512
_LEARN_NAME_MAX: Final = 64
_request_kinds: dict[bytes, int] = {}
_response_kinds: dict[bytes, int] = {}


def _learn(kinds: dict[bytes, int], known: dict[bytes, int], name: bytes, default: int) -> int:
    kind = known.get(name.lower(), default)
    if len(kinds) < _LEARN_MAX and len(name) <= _LEARN_NAME_MAX:
        kinds[name] = kind
    return kind


def scan_request(head: RequestHead, proxy_name: bytes) -> RequestHead:
    """What forwarding needs to know about a request, from one scan of its fields, filled
    into head's own slots (see RequestHead), including the fields to forward as they are
    (so building the upstream head scans nothing). Returns head."""
    named = _scan_fields(head, proxy_name, _NOTHING)
    if named and _names_any(head.headers, named):
        # Connection names fields that are hop-by-hop too (RFC 9110 §7.6.1), and they may
        # come before it: scan again, leaving them out of what is forwarded.
        _scan_fields(head, proxy_name, named)
    return head


def _scan_fields(head: RequestHead, proxy_name: bytes, drop: Set[bytes]) -> Set[bytes]:
    """One pass over the request's fields, leaving out those named in `drop`: sets head's
    scan slots, and returns the names that Connection lists beyond the standard hop-by-hop
    ones. Locals in the loop, one store each at the end: this runs for every request."""
    fields: list[bytes] = []  # name, ": ", value, CRLF of each field forwarded unchanged
    hosts = 0
    host = accept = xff = via_seen = request_id = problem = None
    framing = NO_BODY
    content_length = 0
    looped = te_trailers = False
    named: set[bytes] | None = None  # built only when there is a Connection field
    kinds = _request_kinds
    for name, value in head.headers:
        kind = kinds.get(name)
        if kind is None:
            kind = _learn(kinds, _REQUEST_FIELDS, name, _KEEP)
        if kind == _KEEP:
            pass
        elif kind == _HOST:
            host = value
            hosts += 1
        elif kind == _ACCEPT:
            accept = value
        elif kind == _LENGTH:
            if framing != CHUNKED:  # the codecs reject CL with TE; never trust order
                framing = LENGTH
                content_length = int(value)
            continue  # gatewise frames the body itself
        elif kind == _CODING:
            framing = CHUNKED  # the codec has rejected anything but "..., chunked"
            if value.strip().lower() != b"chunked":
                # RFC 9112 §6.1: a coding we do not implement (gzip, chunked) cannot be
                # re-framed without changing the body; refuse rather than forward it wrong.
                problem = "unsupported transfer coding: " + value.decode("latin-1")
            continue
        elif kind == _REQUEST_ID:
            if _SANE_ID.fullmatch(value):
                request_id = value
            continue  # set by build_request_head, once
        elif kind == _VIA:
            looped = looped or _via_names(value, proxy_name)
            if not drop or name.lower() not in drop:
                via_seen = value if via_seen is None else via_seen + b", " + value
            continue
        elif kind == _XFF:
            if not drop or name.lower() not in drop:
                xff = value if xff is None else xff + b", " + value
            continue
        elif kind == _TE:
            te_trailers = b"trailers" in value.lower()
            continue
        elif kind == _CONNECTION:
            if named is None:
                named = set()
            named.update(_tokens(value))
            continue
        elif kind == _UPGRADE:
            if head.upgrade:  # tunnelling: the upstream must see what is asked for
                fields += (name, b": ", value, b"\r\n")
            continue
        else:
            continue
        if drop and name.lower() in drop:
            continue
        # (appends, not `+= (...)`: no tuple built and freed per field, every request)
        fields.append(name)
        fields.append(b": ")
        fields.append(value)
        fields.append(b"\r\n")
    if framing == LENGTH and content_length == 0:
        framing = NO_BODY
    # RFC 9112 §3.2: exactly one Host in HTTP/1.1, at most one in 1.0, else 400.
    version = head.version
    if hosts > 1:
        problem = "more than one Host header"
    elif hosts == 0 and version == b"1.1":
        problem = "HTTP/1.1 request without a Host header"
    if version != b"1.1" and version != b"1.0":
        # RFC 9110 §6.2: gatewise speaks HTTP/1.x only; HTTP/0.9 has no head to forward.
        problem = "unsupported HTTP version " + version.decode("latin-1")
    method = head.method
    if method == b"CONNECT":
        problem = "CONNECT is not supported: gatewise is a reverse proxy"
    head.idempotent = method in IDEMPOTENT
    head.fields = fields
    head.host = host
    head.accept = accept
    head.xff = xff
    head.via_seen = via_seen
    head.request_id_bytes = request_id or new_request_id_bytes()  # a sane one from the client, else ours
    head.problem = problem
    head.framing = framing
    head.content_length = content_length
    head.looped = looped
    head.te_trailers = te_trailers
    return _NOTHING if named is None else named - HOP_BY_HOP


def _via_names(value: bytes, proxy_name: bytes) -> bool:
    """True when a Via field value lists proxy_name as a received-by (RFC 9110 §7.6.3)."""
    for element in value.split(b","):
        parts = element.split()
        if len(parts) >= 2 and parts[1].lower() == proxy_name:
            return True
    return False


def build_request_head(head: RequestHead, *, target: bytes, client_ip: bytes, proto: bytes,
                       via: bytes) -> bytes:
    """The head gatewise sends upstream, from a scanned head (scan_request). `via` is
    b"1.1 gatewise"."""
    out = [head.method, b" ", target, b" HTTP/1.1\r\n"]
    out += head.fields
    if head.framing == LENGTH:
        out += (b"Content-Length: ", str(head.content_length).encode(), b"\r\n")
    elif head.framing == CHUNKED:
        out.append(b"Transfer-Encoding: chunked\r\n")
    if head.upgrade:
        out.append(b"Connection: upgrade\r\n")
    elif head.te_trailers:
        out.append(b"TE: trailers\r\nConnection: TE\r\n")
    # The fields every request gains, one append per piece, each line's CRLF joined to the
    # next name: fewer pieces for join, and no tuple built and freed per line.
    xff = head.xff
    out.append(b"X-Forwarded-For: ")
    out.append(client_ip if xff is None else xff + b", " + client_ip)
    out.append(b"\r\nX-Forwarded-Proto: ")
    out.append(proto)
    if head.host is not None:
        out.append(b"\r\nX-Forwarded-Host: ")
        out.append(head.host)
    via_seen = head.via_seen
    out.append(b"\r\nVia: ")
    out.append(via if via_seen is None else via_seen + b", " + via)
    out.append(b"\r\nX-Request-Id: ")
    out.append(head.request_id_bytes)
    out.append(b"\r\n\r\n")
    return b"".join(out)


_STATUS_LINES: Final[dict[int, tuple[bytes, bytes]]] = {}  # status -> (standard reason, line); 3 digits: bounded


def status_line(status: int, reason: bytes = b"") -> bytes:
    """b"HTTP/1.1 502 Bad Gateway\r\n"; lines with no or the standard reason are built once."""
    known = _STATUS_LINES.get(status)
    if known is None:
        try:
            phrase = HTTPStatus(status).phrase.encode()
        except ValueError:
            phrase = b"Unknown"
        known = _STATUS_LINES[status] = (phrase, b"HTTP/1.1 %d %s\r\n" % (status, phrase))
    if reason and reason != known[0]:
        return b"HTTP/1.1 %d %s\r\n" % (status, reason)
    return known[1]


# What a response field is to gatewise, by lowercased name (as _REQUEST_FIELDS).
_R_KEEP: Final = 0
_R_LENGTH: Final = 1
_R_CODING: Final = 2
_R_KEEP_ALIVE: Final = 3
_R_CONNECTION: Final = 4
_R_VIA: Final = 5
_R_DATE: Final = 6
_R_UPGRADE: Final = 7
_R_DROP: Final = 8
_RESPONSE_FIELDS: Final = {
    b"content-length": _R_LENGTH, b"transfer-encoding": _R_CODING, b"keep-alive": _R_KEEP_ALIVE,
    b"connection": _R_CONNECTION, b"via": _R_VIA, b"date": _R_DATE, b"upgrade": _R_UPGRADE,
    # hop-by-hop, or set by gatewise
    b"proxy-connection": _R_DROP, b"te": _R_DROP, b"trailer": _R_DROP, b"x-request-id": _R_DROP,
}
# The usual Connection values, as token sets shared by every response (never changed).
_ONE_TOKEN: Final = {b"keep-alive": frozenset({b"keep-alive"}), b"close": frozenset({b"close"})}


def plan_response(head: ResponseHead, *, request_method: bytes, client_version: bytes,
                  client_keep_alive: bool, request_id: bytes, via: bytes,
                  proxy_status: bytes | None) -> ResponseHead:
    """Rewrite an upstream response head for the client, from one scan of its fields:
    fills head's own slots (see ResponseHead: `rewritten`, framing...) and returns head.

    `proxy_status` is our Proxy-Status member for a forwarded 5xx (None otherwise).
    Interim (1xx) heads are passed with hop-by-hop fields removed and no framing."""
    status = head.status
    interim = status < 200
    line = status_line(status, head.reason)
    out = [line]
    tokens, length, chunked, via_seen, date_seen = _response_fields(head, out, _NOTHING)
    if tokens and not tokens <= HOP_BY_HOP and _names_any(head.headers, tokens - HOP_BY_HOP):
        # Connection names fields that are hop-by-hop too (RFC 9110 §7.6.1), and they may
        # come before it: again, leaving them out.
        out = [line]
        tokens, length, chunked, via_seen, date_seen = _response_fields(head, out, frozenset(tokens))
    upstream_keep_alive = not (b"close" in tokens or (head.version == b"1.0" and b"keep-alive" not in tokens))
    out.append(b"Via: ")  # (appends on the lines every response takes: as in build_request_head)
    out.append(via if via_seen is None else via_seen + b", " + via)
    out.append(b"\r\n")
    if not date_seen and not interim:
        # RFC 9110 §6.6.1: a recipient with a clock MUST add Date to a response it forwards
        # without one
        out.append(date_field())
    keep_alive = client_keep_alive
    if interim:
        if status == 101:
            out.append(b"Connection: upgrade\r\n")
        framing = NO_BODY
    else:
        if request_method == b"HEAD" or status in _NO_BODY_STATUS:
            framing = NO_BODY
            if length is not None:  # describes the representation, not this message (§8.6)
                out += (b"Content-Length: ", length, b"\r\n")
        elif chunked:
            framing = CHUNKED
        elif length is not None:
            framing = LENGTH
            out.append(b"Content-Length: ")
            out.append(length)
            out.append(b"\r\n")
        else:
            framing = UNTIL_CLOSE
            upstream_keep_alive = False
        if framing == CHUNKED or framing == UNTIL_CLOSE:
            if client_version == b"1.1":
                framing = CHUNKED
                out.append(b"Transfer-Encoding: chunked\r\n")
            else:  # an HTTP/1.0 client cannot read chunked: delimit by closing (RFC 9112 §6.3)
                framing = UNTIL_CLOSE
                keep_alive = False
        if proxy_status is not None:
            out += (b"Proxy-Status: ", proxy_status, b"\r\n")
        out.append(b"X-Request-Id: ")
        out.append(request_id)
        out.append(b"\r\n")
        if not keep_alive:
            out.append(b"Connection: close\r\n")
        elif client_version == b"1.0":
            out.append(b"Connection: keep-alive\r\n")
    out.append(b"\r\n")
    head.rewritten = b"".join(out)
    head.framing = framing
    head.keep_alive = keep_alive
    head.upstream_keep_alive = upstream_keep_alive
    return head


def _response_fields(head: ResponseHead, out: list[bytes], drop: frozenset[bytes]
                     ) -> tuple[set[bytes] | frozenset[bytes], bytes | None, bool, bytes | None, bool]:
    """One pass over the response's fields: the ones forwarded unchanged go to `out`
    (minus those named in `drop`); sets head.keepalive_timeout and head.problem; returns
    (Connection tokens, Content-Length value, chunked, Via values, Date seen)."""
    tokens: set[bytes] | frozenset[bytes] = _NOTHING  # a new set only for an unusual Connection
    length = via_seen = keepalive_timeout = problem = None
    chunked = date_seen = False
    kinds = _response_kinds
    for name, value in head.headers:
        kind = kinds.get(name)
        if kind is None:
            kind = _learn(kinds, _RESPONSE_FIELDS, name, _R_KEEP)
        if kind == _R_KEEP:
            pass
        elif kind == _R_LENGTH:
            length = value
            continue
        elif kind == _R_DATE:
            if drop and name.lower() in drop:
                continue
            date_seen = True
        elif kind == _R_CODING:
            chunked = True
            if value.strip().lower() != b"chunked":
                # RFC 9112 §6.1: re-framing would drop the other coding and hand the
                # client a body it cannot decode (RFC 9209 §2.3.24).
                problem = "unsupported transfer coding: " + value.decode("latin-1")
            continue
        elif kind == _R_KEEP_ALIVE:
            keepalive_timeout = _keepalive_timeout(value)
            continue
        elif kind == _R_CONNECTION:
            if tokens is _NOTHING and value in _ONE_TOKEN:
                tokens = _ONE_TOKEN[value]
            else:
                tokens = set(tokens)  # a copy: the shared sets stay as they are
                tokens.update(_tokens(value))
            continue
        elif kind == _R_VIA:
            if not drop or name.lower() not in drop:
                via_seen = value if via_seen is None else via_seen + b", " + value
            continue
        elif kind == _R_UPGRADE:
            if head.status == 101:
                out += (name, b": ", value, b"\r\n")
            continue
        else:
            continue
        if drop and name.lower() in drop:
            continue
        out.append(name)  # (appends: as in _scan_fields)
        out.append(b": ")
        out.append(value)
        out.append(b"\r\n")
    head.keepalive_timeout = keepalive_timeout
    head.problem = problem
    return tokens, length, chunked, via_seen, date_seen


def _keepalive_timeout(value: bytes) -> float | None:
    for param in value.split(b","):
        key, _, val = param.strip().partition(b"=")
        if key.strip().lower() == b"timeout":
            try:
                return float(val.strip().strip(b'"'))
            except ValueError:
                return None
    return None


class _DateField:
    """b"Date: <IMF-fixdate>\r\n", rebuilt at most once a second (uvicorn's on_tick idea)."""

    __slots__ = ("second", "field")

    def __init__(self) -> None:
        self.second = -1
        self.field = b""

    def now(self) -> bytes:
        second = int(_wall_clock())
        if second != self.second:
            self.second = second
            self.field = b"Date: " + formatdate(second, usegmt=True).encode() + b"\r\n"
        return self.field


_wall_clock: Final = time.time  # (Final: a C static in the compiled module)
_date: Final = _DateField()


def date_field() -> bytes:
    return _date.now()


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
