"""TLS alerts as OpenSSL reports them: one table for the proxy and the doctor.

OpenSSL names a received alert in SSLError.reason as <VERSION>_ALERT_<NAME> (for
example TLSV13_ALERT_CERTIFICATE_REQUIRED), except alerts 110-114, which it names
TLSV1_<NAME> (TLSV1_UNRECOGNIZED_NAME). RFC 9209 §2.3.15 reports the alert's number
(alert-id) and its TLS Alerts registry description (alert-message).
"""

from __future__ import annotations

# TLS alert descriptions (RFC 8446 §6, RFC 5246 §7.2), by OpenSSL's reason suffix.
ALERTS = {
    "CLOSE_NOTIFY": 0, "UNEXPECTED_MESSAGE": 10, "BAD_RECORD_MAC": 20, "RECORD_OVERFLOW": 22,
    "HANDSHAKE_FAILURE": 40, "BAD_CERTIFICATE": 42, "UNSUPPORTED_CERTIFICATE": 43,
    "CERTIFICATE_REVOKED": 44, "CERTIFICATE_EXPIRED": 45, "CERTIFICATE_UNKNOWN": 46,
    "ILLEGAL_PARAMETER": 47, "UNKNOWN_CA": 48, "ACCESS_DENIED": 49, "DECODE_ERROR": 50,
    "DECRYPT_ERROR": 51, "PROTOCOL_VERSION": 70, "INSUFFICIENT_SECURITY": 71, "INTERNAL_ERROR": 80,
    "INAPPROPRIATE_FALLBACK": 86, "USER_CANCELLED": 90, "MISSING_EXTENSION": 109,
    "UNSUPPORTED_EXTENSION": 110, "CERTIFICATE_UNOBTAINABLE": 111, "UNRECOGNIZED_NAME": 112,
    "BAD_CERTIFICATE_STATUS_RESPONSE": 113, "BAD_CERTIFICATE_HASH_VALUE": 114,
    "UNKNOWN_PSK_IDENTITY": 115, "CERTIFICATE_REQUIRED": 116, "NO_APPLICATION_PROTOCOL": 120,
}

# Alerts that refuse us as a client (no or an unacceptable client certificate).
CLIENT_REFUSED = frozenset({"CERTIFICATE_REQUIRED", "BAD_CERTIFICATE", "UNSUPPORTED_CERTIFICATE",
                            "CERTIFICATE_REVOKED", "CERTIFICATE_EXPIRED", "CERTIFICATE_UNKNOWN",
                            "UNKNOWN_CA", "ACCESS_DENIED"})

_PREFIXES = ("TLSV13_ALERT_", "TLSV1_ALERT_", "SSLV3_ALERT_")


def alert_name(reason: str | None) -> str | None:
    """The alert's name ("CERTIFICATE_REQUIRED") from an SSLError reason, or None."""
    if not reason:
        return None
    for prefix in _PREFIXES:
        if reason.startswith(prefix):
            return reason[len(prefix):]
    if reason.startswith("TLSV1_") and reason[6:] in ALERTS:
        return reason[6:]
    return None


def alert_params(name: str) -> tuple[int | None, str]:
    """(alert-id, alert-message) for RFC 9209 §2.3.15."""
    return ALERTS.get(name), name.lower()
