"""Every way a proxied request can fail, and what each one means.

One row per cause: the status gatewise answers with, the RFC 9209 error token it puts in
`Proxy-Status` (RFC 9209 §2.3), whether a retry is safe because nothing reached the
upstream, and whether the failure counts against the upstream's health.

Rules:
- A failure has exactly one cause. Causes are ours; tokens are the RFC's, and several
  causes may share one token (400, 413 and 431 are all `http_request_error`, §2.3.16).
- `retry_safe` is about the *phase*: True only when the upstream cannot have seen any
  of the request (connect-time failures). Whether a later failure may be retried also
  depends on the method (RFC 9110 §9.2.2) and is decided in proxy/forward.py.
- `blames_upstream` is False for failures the client or gatewise itself caused, so they
  never eject a healthy server.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Cause(StrEnum):
    # connect phase: nothing was sent
    DNS_ERROR = "dns_error"
    DNS_TIMEOUT = "dns_timeout"
    CONNECT_REFUSED = "connect_refused"
    CONNECT_TIMEOUT = "connect_timeout"
    DESTINATION_UNROUTABLE = "destination_unroutable"
    LOCAL_CONNECT_ERROR = "local_connect_error"
    TLS_CERTIFICATE = "tls_certificate"
    TLS_PROTOCOL = "tls_protocol"
    TLS_ALERT = "tls_alert"
    # request sent (perhaps partly), waiting for the response head
    CONNECTION_TERMINATED = "connection_terminated"
    WRITE_TIMEOUT = "write_timeout"
    RESPONSE_TIMEOUT = "response_timeout"
    UPSTREAM_PROTOCOL_ERROR = "upstream_protocol_error"
    RESPONSE_HEADERS_TOO_LARGE = "response_headers_too_large"
    RESPONSE_TRANSFER_CODING = "response_transfer_coding"
    # response head already forwarded: the client connection is aborted, never a 502
    BODY_READ_TIMEOUT = "body_read_timeout"
    RESPONSE_INCOMPLETE = "response_incomplete"
    # gatewise answered without (or before) choosing an upstream
    NO_ROUTE = "no_route"
    NO_SERVER_AVAILABLE = "no_server_available"
    CONNECTION_LIMIT = "connection_limit"
    LOOP_DETECTED = "loop_detected"
    CONFIGURATION_ERROR = "configuration_error"
    # the client's request was unacceptable
    BAD_REQUEST = "bad_request"
    REQUEST_HEADERS_TOO_LARGE = "request_headers_too_large"
    REQUEST_BODY_TOO_LARGE = "request_body_too_large"
    REQUEST_TIMEOUT = "request_timeout"
    # the client went away (nginx's 499): never the upstream's fault, never answered
    CLIENT_DISCONNECTED = "client_disconnected"
    # a bug in gatewise
    PROXY_INTERNAL = "proxy_internal"


@dataclass(frozen=True, slots=True)
class CauseInfo:
    status: int
    token: str  # RFC 9209 §2.3 error type
    retry_safe: bool
    blames_upstream: bool
    summary: str  # a few words for people (logs, /debug, text bodies)


_ = CauseInfo
INFO: dict[Cause, CauseInfo] = {
    # DNS failures say nothing about the server's health: a resolver outage must not
    # eject every named server (the 503 would then hide the real cause).
    Cause.DNS_ERROR: _(502, "dns_error", True, False, "the upstream's name does not resolve"),
    Cause.DNS_TIMEOUT: _(504, "dns_timeout", True, False, "resolving the upstream's name timed out"),
    Cause.TLS_CERTIFICATE: _(502, "tls_certificate_error", True, True,
                             "the upstream's TLS certificate is not trusted"),
    Cause.TLS_PROTOCOL: _(502, "tls_protocol_error", True, True, "the TLS handshake with the upstream failed"),
    Cause.TLS_ALERT: _(502, "tls_alert_received", True, True, "the upstream sent a TLS alert"),
    Cause.CONNECT_REFUSED: _(502, "connection_refused", True, True, "connection refused"),
    Cause.CONNECT_TIMEOUT: _(504, "connection_timeout", True, True, "connect timed out"),
    Cause.DESTINATION_UNROUTABLE: _(502, "destination_ip_unroutable", True, True, "no route to host"),
    Cause.LOCAL_CONNECT_ERROR: _(500, "proxy_internal_error", True, False,
                                 "gatewise could not open a connection (a local resource limit)"),
    Cause.CONNECTION_TERMINATED: _(502, "connection_terminated", False, True,
                                   "upstream closed the connection before a complete response head"),
    Cause.WRITE_TIMEOUT: _(504, "connection_write_timeout", False, True,
                           "upstream stopped reading the request body"),
    Cause.RESPONSE_TIMEOUT: _(504, "http_response_timeout", False, True, "no response head in time"),
    Cause.UPSTREAM_PROTOCOL_ERROR: _(502, "http_protocol_error", False, True,
                                     "upstream response is not valid HTTP/1.1"),
    Cause.RESPONSE_HEADERS_TOO_LARGE: _(502, "http_response_header_section_size", False, True,
                                        "upstream response head too large"),
    Cause.RESPONSE_TRANSFER_CODING: _(502, "http_response_transfer_coding", False, True,
                                      "upstream used a transfer coding gatewise cannot re-frame"),
    Cause.BODY_READ_TIMEOUT: _(504, "connection_read_timeout", False, True,
                               "upstream stalled in the middle of the response body"),
    Cause.RESPONSE_INCOMPLETE: _(502, "http_response_incomplete", False, True,
                                 "upstream cut the response body short"),
    Cause.NO_ROUTE: _(404, "destination_not_found", False, False, "no route matches the request"),
    Cause.NO_SERVER_AVAILABLE: _(503, "destination_unavailable", False, False, "no server available"),
    Cause.CONNECTION_LIMIT: _(503, "connection_limit_reached", False, False,
                              "the pool's connection limit is reached"),
    Cause.LOOP_DETECTED: _(502, "proxy_loop_detected", False, False, "request looped back to this proxy"),
    Cause.CONFIGURATION_ERROR: _(500, "proxy_configuration_error", False, False,
                                 "the route leads nowhere usable"),
    Cause.BAD_REQUEST: _(400, "http_request_error", False, False, "malformed request"),
    Cause.REQUEST_HEADERS_TOO_LARGE: _(431, "http_request_error", False, False, "request head too large"),
    Cause.REQUEST_BODY_TOO_LARGE: _(413, "http_request_error", False, False, "request body too large"),
    Cause.REQUEST_TIMEOUT: _(408, "http_request_error", False, False, "client too slow to send its request"),
    Cause.CLIENT_DISCONNECTED: _(499, "client_disconnected", False, False, "client went away"),
    Cause.PROXY_INTERNAL: _(500, "proxy_internal_error", False, False, "internal error in gatewise"),
}
del _

assert INFO.keys() == set(Cause), "every Cause needs exactly one row"
