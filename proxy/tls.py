"""TLS to https:// upstreams: client contexts, and what a TLS failure means.

Contexts verify by default (system CAs, hostname = the URL host or `sni`); per server
`ca_file` replaces the trust store and `tls_verify = false` turns checking off (tests
only). One context per server, built at load time.

`translate` turns an ssl exception into exactly one cause, using the exception's own
fields (verify_code, reason), never its message text:
- certificate verification  -> tls_certificate_error, saying what was wrong
- a fatal alert from the peer -> tls_alert_received with alert-id and alert-message
- anything else in the handshake (the port speaks plain HTTP, the peer hung up)
                             -> tls_protocol_error
"""

from __future__ import annotations

import ssl

from diagnostics.tls_alerts import CLIENT_REFUSED, alert_name, alert_params
from proxy.errors import (ConnectionTerminated, ProxyError, TlsAlertReceived, TlsCertificateError,
                          TlsProtocolError)

# OpenSSL X509_V_ERR_* codes -> the hint's variant (diagnostics/hints.py).
_VARIANT = {9: "expired", 10: "expired", 18: "self_signed", 19: "self_signed", 20: "unknown_ca",
            21: "unknown_ca", 62: "name"}

# OpenSSL X509_V_ERR_* codes worth naming (openssl/x509_vfy.h).
_VERIFY = {
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in the chain",
    20: "unknown CA: unable to get the issuer's certificate",
    21: "unknown CA: unable to verify the first certificate",
    62: "hostname mismatch",
}

def client_context(*, verify: bool = True, ca_file: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca_file)
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def translate_after_handshake(exc: ssl.SSLError, *, upstream: str, fresh: bool) -> ProxyError:
    """A TLS error once the session was up and our request sent. Retry-safe only when
    it is a client-refused alert on a connection that never carried a request before;
    otherwise the request may have reached the application: connection_terminated."""
    reason = getattr(exc, "reason", None) or ""
    name = alert_name(reason)
    # TLS 1.3 sends these after the handshake, when our request is already on its way
    if fresh and name in CLIENT_REFUSED:
        return translate(exc, upstream=upstream, server_name="")
    return ConnectionTerminated(f"the TLS session failed after the request was sent: "
                                f"{name.lower() if name else reason or exc}", upstream=upstream)


def translate(exc: ssl.SSLError | OSError, *, upstream: str, server_name: str) -> ProxyError:
    if isinstance(exc, ssl.SSLCertVerificationError):
        what = _VERIFY.get(exc.verify_code, exc.verify_message or "verification failed")
        if exc.verify_code == 62:
            what = f"hostname mismatch: the certificate is not valid for {server_name}"
        return TlsCertificateError(f"certificate rejected: {what}", upstream=upstream,
                                   variant=_VARIANT.get(exc.verify_code))
    reason = getattr(exc, "reason", None) or ""
    name = alert_name(reason)
    if name is not None:
        alert_id, message = alert_params(name)
        return TlsAlertReceived(f"the upstream sent TLS alert {message}", upstream=upstream,
                                alert_id=alert_id, alert_message=message)
    if reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNKNOWN_PROTOCOL", "RECORD_LAYER_FAILURE"):
        return TlsProtocolError("the answer to our TLS handshake is not TLS: the upstream speaks "
                                "plain HTTP on this port? use http://", upstream=upstream)
    if isinstance(exc, (ssl.SSLEOFError, ConnectionResetError)):
        return TlsProtocolError("the upstream closed the connection during the TLS handshake",
                                upstream=upstream)
    return TlsProtocolError(f"TLS handshake failed: {reason or exc}", upstream=upstream)
