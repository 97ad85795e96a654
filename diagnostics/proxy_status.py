"""The `Proxy-Status` field value (RFC 9209), as bytes.

Proxy-Status is an RFC 8941 List. Each intermediary that handled the response adds one
member naming itself, with Parameters saying what happened (RFC 9209 §2). This module
renders gatewise's member and appends it to whatever came from further in.

Rules:
- Pure and total over its inputs: no I/O, no config, no logging.
- The output is always ONE valid RFC 8941 list member made of printable ASCII. Strings
  that come from the outside world (details, next-hop, the proxy name) are sanitised, not
  trusted: any character outside 0x20-0x7E becomes "?", so nothing a failing upstream
  says can ever break header framing or inject a header (RFC 8941 §3.3.3).
- Names we choose in code (the error token, extra parameter keys) must already be valid;
  an invalid one is a programming error and raises ValueError.
- Parameter order is fixed: error, next-hop, received-status, details, then extras.
- Hot-ish path: the `; error=<token>` bytes for every Cause are built once, at import,
  and the rendered member name is cached per proxy name.
"""

from __future__ import annotations

import re
from functools import lru_cache

from diagnostics.causes import INFO, Cause

# RFC 8941 §3.3.4: sf-token = ( ALPHA / "*" ) *( tchar / ":" / "/" ), with tchar from
# RFC 9110 §5.6.2.
_TOKEN = re.compile(r"[A-Za-z*][!#$%&'*+\-.^_`|~0-9A-Za-z:/]*")
# RFC 8941 §3.1.2: key = ( lcalpha / "*" ) *( lcalpha / DIGIT / "_" / "-" / "." / "*" )
_KEY = re.compile(r"[a-z*][a-z0-9_\-.*]*")
# RFC 8941 §3.3.3: an sf-string holds only printable ASCII (0x20-0x7E).
_NOT_PRINTABLE_ASCII = re.compile(r"[^\x20-\x7e]")

# RFC 8941 §3.3.1: Integers have at most 15 digits.
_INT_MAX = 999_999_999_999_999

# Strings are cut to this many characters so one pathological message (a huge upstream
# error text) cannot push the response head past common client limits (node: 16 KiB for
# the whole head; nginx's large_client_header_buffers: 8 KiB per line).
MAX_STRING_CHARS = 1024

_RESERVED_KEYS = frozenset({"error", "next-hop", "received-status", "details"})


def is_token(value: str) -> bool:
    """True when `value` can be serialised as an RFC 8941 Token (§3.3.4)."""
    return _TOKEN.fullmatch(value) is not None


def is_key(value: str) -> bool:
    """True when `value` is a valid RFC 8941 parameter key (§3.1.2)."""
    return _KEY.fullmatch(value) is not None


def sf_string(value: str) -> str:
    """Serialise `value` as an RFC 8941 String (§4.1.6), replacing what cannot be sent.

    §3.3.3 allows only printable ASCII; anything else (CR, LF, NUL, DEL, non-ASCII)
    would fail serialisation, so it becomes "?" instead: a Proxy-Status header is never
    worth failing a response over. Then `\\` and `"` are escaped, the only escapes §3.3.3
    allows.
    """
    if len(value) > MAX_STRING_CHARS:
        value = value[: MAX_STRING_CHARS - 3] + "..."
    if not (value.isascii() and value.isprintable()):  # fast path: already clean
        value = _NOT_PRINTABLE_ASCII.sub("?", value)
    if "\\" in value or '"' in value:
        value = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{value}"'


def _sf_integer(value: int) -> str:
    # RFC 8941 §4.1.4: out-of-range integers fail serialisation. bool is an int in Python
    # but a Boolean in RFC 8941, so it never gets here (see _bare_item).
    if not -_INT_MAX <= value <= _INT_MAX:
        raise ValueError(f"integer {value} is out of the RFC 8941 §3.3.1 range")
    return str(value)


def _bare_item(value: str | int) -> str:
    if isinstance(value, bool):  # RFC 8941 §4.1.9: ?1 / ?0
        return "?1" if value else "?0"
    if isinstance(value, int):
        return _sf_integer(value)
    if isinstance(value, str):
        return sf_string(value)
    raise ValueError(f"unsupported parameter value type {type(value).__name__}")


@lru_cache(maxsize=16)
def _member_name(proxy_name: str) -> str:
    # RFC 9209 §2: each member is a String or a Token identifying the intermediary.
    # A Token reads better (`gatewise; error=...`), so use it whenever the name is one.
    return proxy_name if is_token(proxy_name) else sf_string(proxy_name)


def _error_param(token: str) -> str:
    # RFC 9209 §2.1.1: the error parameter's value is a Token (a §2.3 error type).
    if not is_token(token):
        raise ValueError(f"error type {token!r} is not an RFC 8941 token")
    return f"; error={token}"


# Built once at import (STYLE §5): the part of each member that depends only on the Cause.
_CAUSE_PARAM: dict[Cause, str] = {cause: _error_param(info.token) for cause, info in INFO.items()}


def _render(name: str, error_param: str, next_hop: str | None, details: str | None,
            received_status: int | None, extra: tuple[tuple[str, str | int], ...]) -> bytes:
    parts = [name, error_param]
    if next_hop is not None:
        # RFC 9209 §2.1.2: next-hop is a String or Token. Always a String here: a
        # "host:port" happens to be a valid token but an IPv6 literal is not, and one
        # form is easier for people and scripts to read.
        parts.append("; next-hop=")
        parts.append(sf_string(next_hop))
    if received_status is not None:
        # RFC 9209 §2.1.4: received-status is an Integer.
        parts.append("; received-status=")
        parts.append(_sf_integer(received_status))
    if details is not None:
        # RFC 9209 §2.1.5: details is a String, for people, not for parsing.
        parts.append("; details=")
        parts.append(sf_string(details))
    for key, value in extra:
        # RFC 9209 §2.2: further parameters are keys registered (or private) by name.
        if not is_key(key) or key in _RESERVED_KEYS:
            raise ValueError(f"bad extra Proxy-Status parameter key {key!r}")
        parts.append(f"; {key}={_bare_item(value)}")
    # Everything above is printable ASCII by construction, so this cannot fail.
    return "".join(parts).encode("ascii")


def render(proxy_name: str, *, error: str | None = None, next_hop: str | None = None,
           details: str | None = None, received_status: int | None = None,
           extra: tuple[tuple[str, str | int], ...] = ()) -> bytes:
    """One RFC 9209 list member, e.g. `gatewise; error=connection_refused; next-hop="h:1"`.

    `error` must be an RFC 9209 §2.3 error type (a valid token). Use it when gatewise
    generated the response; use `received_status` (and no error) when it forwarded an
    upstream's 5xx, so a 502 the upstream made is never taken for one gatewise made.
    """
    error_param = "" if error is None else _error_param(error)
    return _render(_member_name(proxy_name), error_param, next_hop, details,
                   received_status, extra)


def render_cause(proxy_name: str, cause: Cause, *, next_hop: str | None = None,
                 details: str | None = None, minimal: bool = False,
                 extra: tuple[tuple[str, str | int], ...] = ()) -> bytes:
    """The member for a response gatewise generated because of `cause`.

    `minimal=True` (SPEC `detail = "minimal"`) emits only the error parameter: no next
    hop, no details, nothing about the inside of the deployment.
    """
    if minimal:
        return (_member_name(proxy_name) + _CAUSE_PARAM[cause]).encode("ascii")
    # extra: the cause's own RFC 9209 parameters (rcode, alert-id, alert-message)
    return _render(_member_name(proxy_name), _CAUSE_PARAM[cause], next_hop, details, None, extra)


def append(existing: bytes | None, member: bytes) -> bytes:
    """Append our member to a Proxy-Status field value received from further in.

    RFC 9209 §2: the first member is the intermediary closest to the origin and each
    intermediary appends its own, so the upstream's members stay first. `existing` is the
    combined field value (several field lines joined with ", ", RFC 9110 §5.3); if it is
    missing or blank our member stands alone. An upstream value that is not a valid List
    is passed on as it came: appending does not make it any worse.
    """
    if existing is None:
        return member
    existing = existing.strip(b" \t")
    if not existing:
        return member
    return existing + b", " + member
