"""What a person should check next, for each cause: the `hint` of SPEC's error body.

A hint is written with the real values of this failure ("Nothing is listening on
127.0.0.1:9002") and names the command or config key to look at next. The advice is
the "what to check next" column of docs/errors.md.

Rules:
- ONE table, HINTS: key -> the hint's pieces, in order. Keys are Cause *values*
  (strings, not enum members), so causes still being added elsewhere (DNS, TLS) can have
  their hint here first. A key "cause:variant" is used instead of "cause" when the
  failure carries that variant (set where the error is created, from structured facts
  such as an OpenSSL verify code; never by matching message text, STYLE §4).
- A piece is a template, or a tuple of alternative templates: the first one whose
  values are all known is used, and a piece with none usable is dropped. So a missing
  value degrades the text ("No response head in time" instead of "within 30 s") and
  never renders as "None" or "{server}".
- Plain text, one paragraph: no markdown except backticks around commands and config
  keys that should be changed. A config key in parentheses names the setting that fired,
  written as in `details` (timeouts.response_header). Escaping for HTML or JSON is the
  renderer's job (diagnostics/error_body.py).
- The hint goes in the error body and /debug/requests, never in Proxy-Status (issue 4):
  it is advice, not protocol.
- Pure: no I/O, no config; the caller hands in what it knows as a HintContext.
"""

from __future__ import annotations

import math
import string
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

TIMEOUT_KEYS = ("connect", "response_header", "idle_read", "client_header", "client_idle")
LIMIT_KEYS = ("max_request_header_bytes", "max_response_header_bytes", "max_request_body_bytes")

_EMPTY: Mapping = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class HintContext:
    """What is known about one failure. Every field is optional."""

    server: str | None = None  # the next hop as host:port, "127.0.0.1:9002"
    host: str | None = None  # the server's host (name or IP); derived from server if absent
    port: int | None = None  # derived from server if absent
    scheme: str = "http"
    at: float | None = None  # unix time of the failure, shown as UTC HH:MM:SS
    timeouts: Mapping[str, float] = field(default_factory=lambda: _EMPTY)  # seconds, TIMEOUT_KEYS
    limits: Mapping[str, int] = field(default_factory=lambda: _EMPTY)  # bytes, LIMIT_KEYS
    p99_ms: float | None = None  # the server's recent p99 latency, when known
    details: str | None = None  # the failure's details text
    pool: str | None = None
    path: str | None = None  # the request path
    proxy_name: str = "gatewise"  # diagnostics.proxy_name
    reasons: str | None = None  # destination_unavailable: why each server is out
    variant: str | None = None  # the failure's own refinement ("expired", "tls", ...)


_CERT_CHECKS = (
    "Check the certificate chain the server sends, `ca_file` when a private CA signed it, "
    "and that the name in the URL (or `sni`) is one the certificate names.",
    ("See what it presents with `openssl s_client -connect {server} -servername {host}`.",
     "See what it presents with `openssl s_client -connect HOST:PORT -servername NAME`."),
    "`tls_verify = false` is for testing only.",
)

# key -> pieces. Field names: see _FIELDS below (timeouts and limits by their key).
HINTS: dict[str, tuple[str | tuple[str, ...], ...]] = {
    # connect phase: nothing was sent
    "connect_refused": (
        ("Nothing is listening on {server}.", "Nothing is listening on the server's port."),
        "Is the service running? Is it listening on another port? (`ss -tlnp`).",
        "Is it bound to 127.0.0.1 while gatewise connects to another address, or the "
        "reverse? For a container, check the published port.",
    ),
    "connect_timeout": (
        ("No connection to {server} within {connect} (timeouts.connect).",
         "No connection to {server} in time (timeouts.connect).",
         "No connection in time (timeouts.connect)."),
        "Packets are probably being dropped: check firewalls and security groups, that the "
        "host is up and that the address is right.",
        ("Try `nc -vz -w 3 {host} {port}` from this machine.",),
        "A full listen backlog on the upstream can also cause this.",
    ),
    "destination_unroutable": (
        ("There is no route to {host}: the host or its network is unreachable from here.",
         "The host or its network is unreachable from here."),
        "Check routing, interfaces and VPN",
        ("(`ip route get {host}`).", "(`ip route`)."),
    ),
    "local_connect_error": (
        ("This machine could not open a connection to {server}: a local resource ran out.",
         "This machine could not open a connection: a local resource ran out."),
        "Check the proxy host's limits: open files (`ulimit -n`), the ephemeral port range "
        "(`sysctl net.ipv4.ip_local_port_range`) and connections stuck in TIME_WAIT (`ss -s`).",
    ),
    "dns_error": (
        ("The name {host} does not resolve.", "The server's name does not resolve."),
        "Check its spelling in `url`, /etc/hosts and the resolver in /etc/resolv.conf",
        ("(`getent hosts {host}`).", "(`getent hosts NAME`)."),
    ),
    "dns_timeout": (
        ("The resolver did not answer for {host} in time.",
         "The resolver did not answer in time."),
        "Check that the resolvers in /etc/resolv.conf are reachable and answering",
        ("(`getent hosts {host}`),", "(`getent hosts NAME`),"),
        "or put the name in /etc/hosts.",
    ),
    # TLS handshake (https:// servers)
    "tls_certificate": (
        ("The certificate of {server} was not accepted.",
         "The server's certificate was not accepted."),
        *_CERT_CHECKS,
    ),
    "tls_certificate:expired": (
        ("The certificate of {server} has expired or is not yet valid.",
         "The server's certificate has expired or is not yet valid."),
        "Renew it on the server, and check the clocks of both machines.",
        *_CERT_CHECKS,
    ),
    "tls_certificate:self_signed": (
        ("The certificate of {server} is self-signed.",
         "The server's certificate is self-signed."),
        "Put it, or the CA that signed it, in the server's `ca_file`.",
        *_CERT_CHECKS,
    ),
    "tls_certificate:name": (
        ("The certificate of {server} does not name {host}.",
         "The server's certificate does not name the host in its URL."),
        "Use a name the certificate names in the URL, or set `sni` to one.",
        *_CERT_CHECKS,
    ),
    "tls_certificate:unknown_ca": (
        ("The certificate of {server} is signed by a CA this machine does not trust.",
         "The server's certificate is signed by a CA this machine does not trust."),
        "Set the server's `ca_file` to that CA, or make the server send its full chain.",
        *_CERT_CHECKS,
    ),
    "tls_protocol": (
        ("The TLS handshake with {server} failed.", "The TLS handshake failed."),
        ("The server may speak plain HTTP on this port: use http://{server} in its `url`.",
         "The server may speak plain HTTP on this port: use http:// in its `url`."),
        "Otherwise compare the TLS versions it accepts",
        ("(`openssl s_client -connect {server}`).", "(`openssl s_client -connect HOST:PORT`)."),
    ),
    "tls_alert": (
        ("{server} aborted the TLS handshake with an alert (alert-message in details).",
         "The server aborted the TLS handshake with an alert (alert-message in details)."),
        "Check its TLS logs: it may want a client certificate, refuse the name sent as SNI "
        "(the URL's host or `sni`), or not support this TLS version.",
    ),
    # request sent (perhaps partly), waiting for the response head
    "connection_terminated": (
        "Upstream closed the connection before answering: it may have crashed or been "
        "killed (OOM?).",
        ("Check its logs around {at} UTC", "Check its logs"),
        "for a crash, an OOM kill, a restart or deploy, a worker timeout, or a request-size "
        "limit that closes the connection.",
    ),
    "write_timeout": (
        ("{server} read none of the request body for {idle_read} (timeouts.idle_read).",
         "The upstream read none of the request body for {idle_read} (timeouts.idle_read).",
         "The upstream stopped reading the request body (timeouts.idle_read)."),
        "A worker may be blocked before reading it, or an upload limit is enforced by not "
        "reading: check its logs and upload limits.",
    ),
    "response_timeout": (
        ("No response head within {response_header} (timeouts.response_header).",
         "No response head in time (timeouts.response_header)."),
        ("The upstream is slow or stuck; its p99 latency is {p99}.",
         "The upstream is slow or stuck."),
        "Compare the endpoint's latency with timeouts.response_header, and look for a lock or a "
        "full worker pool.",
    ),
    "upstream_protocol_error": (
        ("The answer from {server} is not valid HTTP/1.1.",
         "The upstream's answer is not valid HTTP/1.1."),
        "Is `url` pointing at the right service and port, not at a database, a gRPC port or a "
        "TLS port?",
        ("See what it sends with `curl -v --http0.9 {scheme}://{server}{path}`.",
         "See what it sends with `curl -v --http0.9 {scheme}://{server}/`."),
    ),
    "upstream_protocol_error:tls": (
        ("{server} answered with TLS: it speaks HTTPS on this port, so use https://{server} "
         "in its `url`.",
         "The upstream answered with TLS: it speaks HTTPS on this port, so use https:// in "
         "its `url`."),
    ),
    "response_headers_too_large": (
        ("The response head is over {max_response_header_bytes} "
         "(limits.max_response_header_bytes).",
         "The response head is over limits.max_response_header_bytes."),
        "Look for very large cookies or headers from the upstream, and raise the limit if "
        "they are legitimate.",
        ("See them with `curl -sI {scheme}://{server}{path}`.",
         "See them with `curl -sI {scheme}://{server}/`."),
    ),
    "response_transfer_coding": (
        ("{server} used a transfer coding other than plain chunked (such as `gzip, chunked`), "
         "which cannot be re-framed.",
         "The upstream used a transfer coding other than plain chunked (such as `gzip, chunked`), "
         "which cannot be re-framed."),
        "Configure it to send `Content-Encoding: gzip` (end to end) instead.",
    ),
    # response head already forwarded: the client connection was aborted
    "body_read_timeout": (
        ("After the response head was forwarded, the upstream sent no body bytes for {idle_read} "
         "(timeouts.idle_read), so the client connection was aborted.",
         "After the response head was forwarded, the upstream stopped sending the body "
         "(timeouts.idle_read), so the client connection was aborted."),
        "Look for a stalled stream: a stuck generator or a slow query behind a streamed response.",
        ("Check its logs around {at} UTC.", "Check its logs."),
    ),
    "response_incomplete": (
        "After the response head was forwarded, the upstream cut the body short, so the client "
        "connection was aborted.",
        ("Check its logs around {at} UTC for a crash mid-response,",
         "Check its logs for a crash mid-response,"),
        "and that its Content-Length matches the body it sends.",
    ),
    # answered without (or before) choosing an upstream
    "no_route": (
        ("No `[[routes]]` entry matches {path}.", "No `[[routes]]` entry matches this request."),
        "Check the Host the client sent (the port is ignored), that prefixes match on segment "
        "boundaries (`/api` does not match `/apix`), and route order: the first match wins.",
    ),
    "no_server_available": (
        ("Every server of pool {pool} is out: {reasons}.", "Every server is out: {reasons}.",
         "Every server of pool {pool} is out, backups included.",
         "Every server of the pool is out, backups included."),
        "Check those servers (is the service up, does the health `path` answer with a status in "
        "`expect_status`?), the `server_state` lines in the log and `/debug/upstreams` on the "
        "admin listener.",
    ),
    "connection_limit": (
        ("The requests in flight to pool {pool} reached its `max_connections`.",
         "The requests in flight to the pool reached its `max_connections`."),
        ("Raise `pools.{pool}.max_connections` if the servers can take more,",
         "Raise the pool's `max_connections` if the servers can take more,"),
        "add servers, or find out why responses are slow to finish (`/debug/upstreams` shows "
        "active requests and latency).",
    ),
    "loop_detected": (
        "The request came back to this proxy: Via already names {proxy_name}.",
        "An upstream `url` probably points at this proxy's own listen address, or two proxies "
        "in the chain share the name {proxy_name}: give each its own `proxy_name`.",
    ),
    "configuration_error": (
        ("The route for {path} leads nowhere usable (pool {pool}).",
         "The route leads nowhere usable (pool {pool}).", "The route leads nowhere usable."),
        "Check that its pool exists and has servers, and run `gatewise doctor -c CONFIG`.",
    ),
    # the client's request was unacceptable
    "bad_request": (
        "The request was malformed or ambiguous and was not forwarded (the parser's message is "
        "in details).",
        "Fix the client, or the intermediary in front of this proxy, that sent it.",
    ),
    "request_headers_too_large": (
        ("The request head is over {max_request_header_bytes} "
         "(limits.max_request_header_bytes).",
         "The request head is over limits.max_request_header_bytes."),
        "Look for huge cookies or headers from the client; raise the limit only if they are "
        "legitimate.",
    ),
    "request_body_too_large": (
        ("The request body is over {max_request_body_bytes} "
         "(limits.max_request_body_bytes).",
         "The request body is over limits.max_request_body_bytes."),
        "Send a smaller body, or raise the limit if uploads this large are expected.",
    ),
    "request_timeout": (
        ("The client did not send its request head within {client_header} "
         "(timeouts.client_header),",
         "The client did not send its request head in time (timeouts.client_header),"),
        ("or stopped sending its body for {client_idle} (timeouts.client_idle).",
         "or stopped sending its body (timeouts.client_idle)."),
        "Look for a slow or stuck client, or one that opened a connection without using it.",
    ),
    "client_disconnected": (
        "The client went away before the response was complete.",
        ("Its timeout may be shorter than the upstream's latency (p99 {p99}).",
         "Its timeout may be shorter than the upstream's latency."),
        "A client that half-closes after sending (`nc -N`) also counts as gone.",
    ),
    "proxy_internal": (
        "This is a bug in gatewise.",
        ("Report it with the request id and the `internal_error` traceback logged around "
         "{at} UTC on stderr.",
         "Report it with the request id and the `internal_error` traceback from stderr."),
    ),
}

# (cause value, pattern searched in details, variant key). First match wins.
VARIANTS = frozenset(key.partition(":")[2] for key in HINTS if ":" in key)

_FIELDS = frozenset({"server", "host", "port", "scheme", "at", "p99", "details", "pool", "path",
                     "proxy_name", "reasons", *TIMEOUT_KEYS, *LIMIT_KEYS})


def _names(template: str) -> frozenset[str]:
    parsed = string.Formatter().parse(template)
    return frozenset(name for _, name, _, _ in parsed if name is not None)


# Every template's field names, once; a misspelt field fails at import, not in production.
_TEMPLATE_FIELDS: dict[str, frozenset[str]] = {}
for _pieces in HINTS.values():
    for _piece in _pieces:
        for _template in (_piece,) if isinstance(_piece, str) else _piece:
            _TEMPLATE_FIELDS[_template] = _names(_template)
            assert _TEMPLATE_FIELDS[_template] <= _FIELDS, _template
assert all(key.partition(":")[0] in HINTS for key in HINTS if ":" in key)


def hint_for(cause_value: str, ctx: HintContext) -> str | None:
    """The hint for this cause, or None for an unknown cause."""
    key = str(cause_value)
    if ":" in key:  # variant keys come from ctx.variant, never asked for directly
        return None
    if ctx.variant and f"{key}:{ctx.variant}" in HINTS:
        key = f"{key}:{ctx.variant}"
    pieces = HINTS.get(key)
    if pieces is None:
        return None
    values = _values(ctx)
    out = []
    for piece in pieces:
        for template in (piece,) if isinstance(piece, str) else piece:
            if all(values.get(name) is not None for name in _TEMPLATE_FIELDS[template]):
                out.append(template.format_map(values))
                break
    return " ".join(out)


def _values(ctx: HintContext) -> dict[str, str | None]:
    host, port, server = _text(ctx.host), ctx.port, _text(ctx.server)
    if server is not None and (host is None or port is None):
        name, sep, number = server.rpartition(":")
        if sep and name and number.isdigit():
            host = host or name.removeprefix("[").removesuffix("]")
            port = port if port is not None else int(number)
    if server is None and host is not None and port is not None:
        server = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    path = _text(ctx.path)
    values: dict[str, str | None] = {
        "server": server,
        "host": host,
        "port": str(port) if isinstance(port, int) and not isinstance(port, bool) else None,
        "scheme": _text(ctx.scheme) or "http",
        "at": _clock(ctx.at),
        "p99": _seconds(ctx.p99_ms / 1000) if _number(ctx.p99_ms) else None,
        "details": _text(ctx.details),
        "pool": _text(ctx.pool),
        "path": path if path is None or path.startswith("/") else None,
        "proxy_name": _text(ctx.proxy_name) or "gatewise",
        "reasons": (_text(ctx.reasons) or "").rstrip(".;, ") or None,
    }
    timeouts = ctx.timeouts if isinstance(ctx.timeouts, Mapping) else _EMPTY
    limits = ctx.limits if isinstance(ctx.limits, Mapping) else _EMPTY
    for key in TIMEOUT_KEYS:
        value = timeouts.get(key)
        values[key] = _seconds(value) if _number(value) else None
    for key in LIMIT_KEYS:
        value = limits.get(key)
        values[key] = _size(int(value)) if _number(value) else None
    return values


def _text(value: object) -> str | None:
    """One line of text, or None when there is nothing to show."""
    if not isinstance(value, str):
        return None
    return " ".join(value.split()) or None


def _number(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value >= 0)


def _seconds(seconds: float) -> str:
    """30.0 -> "30 s", 41.25 -> "41.2 s", 0.25 -> "250 ms"."""
    if seconds < 1:
        ms = seconds * 1000
        return f"{_trim(ms, 1 if ms < 10 else 0)} ms"
    return f"{_trim(seconds, 1 if seconds < 100 else 0)} s"


def _trim(number: float, digits: int) -> str:
    text = f"{number:.{digits}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def _size(n: int) -> str:
    """Bytes as configured, in KiB or MiB when that is exact."""
    for unit, factor in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= factor and n % factor == 0:
            return f"{n // factor} {unit}"
    return f"{n} bytes"


def _clock(at: float | None) -> str | None:
    if not _number(at):
        return None
    try:
        return time.strftime("%H:%M:%S", time.gmtime(at))
    except (OverflowError, OSError, ValueError):
        return None
