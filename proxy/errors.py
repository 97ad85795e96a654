"""The exception tree: one leaf class per failure cause, grouped by phase.

The phase decides retry safety (Caddy's DialError vs roundtripSucceededError; httpcore's
ConnectTimeout vs ReadTimeout), so intermediate classes are phases and carry no cause:
- BeforeSend: nothing reached the upstream; always safe to try another server.
- AwaitingHead: the request went out (perhaps partly); retry only when idempotent.
- AfterHead: the response head was already forwarded; the client connection is aborted.
- Refused: gatewise answers on its own (no route, loop, nothing available, bad request).

Only leaves are raised, and each leaf names exactly one Cause. OS and codec errors are
translated into these once, in proxy/upstream_conn.py and proxy/downstream.py; nothing
matches on message text.
"""

from __future__ import annotations

from typing import ClassVar

from diagnostics.causes import Cause


class ProxyError(Exception):
    cause: ClassVar[Cause]
    # The cause's own RFC 9209 parameters for Proxy-Status (rcode, alert-id, ...).
    params: tuple[tuple[str, str | int], ...] = ()
    # A refinement of the cause for the hint ("expired" for a certificate error), set
    # where the error is made from structured facts, never parsed back from `detail`.
    hint_variant: str | None = None

    def __init__(self, detail: str = "", *, upstream: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.upstream = upstream


# -- phases ---------------------------------------------------------------------------
class BeforeSend(ProxyError):
    """Nothing reached the upstream: always retry-safe."""


class AwaitingHead(ProxyError):
    """The request was (perhaps partly) sent and no response head has arrived."""


class AfterHead(ProxyError):
    """The response head was forwarded: the only honest move is to abort the client."""


class Refused(ProxyError):
    """gatewise answers by itself; no upstream is involved."""


class ClientFault(ProxyError):
    """The client's request cannot be forwarded (RFC 9209 §2.3.16 http_request_error)."""


# -- leaves: connect ------------------------------------------------------------------
class DnsError(BeforeSend):
    """The name does not resolve (RFC 9209 §2.3.2; rcode like "NXDOMAIN" when known)."""

    cause = Cause.DNS_ERROR

    def __init__(self, detail: str = "", *, upstream: str | None = None, rcode: str | None = None) -> None:
        super().__init__(detail, upstream=upstream)
        if rcode:
            self.params = (("rcode", rcode),)


class DnsTimeout(BeforeSend):
    cause = Cause.DNS_TIMEOUT


class TlsCertificateError(BeforeSend):
    cause = Cause.TLS_CERTIFICATE

    def __init__(self, detail: str = "", *, upstream: str | None = None, variant: str | None = None) -> None:
        super().__init__(detail, upstream=upstream)
        self.hint_variant = variant


class TlsProtocolError(BeforeSend):
    cause = Cause.TLS_PROTOCOL


class TlsAlertReceived(BeforeSend):
    """The upstream ended the handshake with a TLS alert (RFC 9209 §2.3.15). The HTTP
    request never reached its application, so this stays retry-safe even when the
    alert arrives after our first bytes (TLS 1.3 client-certificate checks)."""

    cause = Cause.TLS_ALERT

    def __init__(self, detail: str = "", *, upstream: str | None = None, alert_id: int | None = None,
                 alert_message: str | None = None) -> None:
        super().__init__(detail, upstream=upstream)
        params: list[tuple[str, str | int]] = []
        if alert_id is not None:
            params.append(("alert-id", alert_id))
        if alert_message:
            params.append(("alert-message", alert_message))
        self.params = tuple(params)


class ConnectRefused(BeforeSend):
    cause = Cause.CONNECT_REFUSED


class ConnectTimeout(BeforeSend):
    cause = Cause.CONNECT_TIMEOUT


class DestinationUnroutable(BeforeSend):
    cause = Cause.DESTINATION_UNROUTABLE


class LocalConnectError(BeforeSend):
    """Opening the socket failed on this machine (EMFILE, EADDRNOTAVAIL...): not the
    upstream's fault (RFC 9209 §2.3.30 proxy_internal_error)."""

    cause = Cause.LOCAL_CONNECT_ERROR


# -- leaves: waiting for the head ---------------------------------------------------------
class ConnectionTerminated(AwaitingHead):
    cause = Cause.CONNECTION_TERMINATED


class WriteTimeout(AwaitingHead):
    cause = Cause.WRITE_TIMEOUT


class ResponseTimeout(AwaitingHead):
    cause = Cause.RESPONSE_TIMEOUT


class UpstreamProtocolError(AwaitingHead):
    cause = Cause.UPSTREAM_PROTOCOL_ERROR


class ResponseHeadersTooLarge(AwaitingHead):
    cause = Cause.RESPONSE_HEADERS_TOO_LARGE


class UnsupportedTransferCoding(AwaitingHead):
    cause = Cause.RESPONSE_TRANSFER_CODING


# -- leaves: mid-body -------------------------------------------------------------------------
class BodyReadTimeout(AfterHead):
    cause = Cause.BODY_READ_TIMEOUT


class ResponseIncomplete(AfterHead):
    cause = Cause.RESPONSE_INCOMPLETE


# -- leaves: gatewise answers by itself --------------------------------------------------------
class NoRoute(Refused):
    cause = Cause.NO_ROUTE


class NoServerAvailable(Refused):
    cause = Cause.NO_SERVER_AVAILABLE


class ConnectionLimitReached(Refused):
    cause = Cause.CONNECTION_LIMIT


class LoopDetected(Refused):
    cause = Cause.LOOP_DETECTED


class ConfigurationError(Refused):
    cause = Cause.CONFIGURATION_ERROR


class BadRequest(ClientFault):
    cause = Cause.BAD_REQUEST


class RequestHeadersTooLarge(ClientFault):
    cause = Cause.REQUEST_HEADERS_TOO_LARGE


class RequestBodyTooLarge(ClientFault):
    cause = Cause.REQUEST_BODY_TOO_LARGE


class ClientTimeout(ClientFault):
    """The client did not send its request (or read our answer) in time."""

    cause = Cause.REQUEST_TIMEOUT


class ClientDisconnected(ProxyError):
    """The client went away; never counted against the upstream."""

    cause = Cause.CLIENT_DISCONNECTED
