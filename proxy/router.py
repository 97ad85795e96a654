"""Request head -> Route (pure: no I/O; the table is compiled once, at load time).

Rules:

- Routes are tried in config order and the first match wins. A route matches when both
  its host pattern and its path prefix match.
- Host (RFC 9110 §7.2): compared case-insensitively, ignoring the port (":8080") and one
  trailing dot (an absolute FQDN, "example.com." names the same host). IPv6 literals
  are written in brackets ("[::1]:8080", RFC 3986 §3.2.2); the brackets and port are
  removed, so the pattern "[::1]" (or "::1") matches. An absent or empty Host matches
  only the pattern "*".
- Host patterns: "*" matches anything, including no Host at all; "api.example.com"
  matches that host exactly; "*.example.com" matches any host under example.com at any
  depth (a.example.com, a.b.example.com) but not example.com itself.
- Path prefix: matched against the path part of the target only (before "?"),
  case-sensitively (RFC 3986 §6.2.2.1: paths are case-sensitive), on segment
  boundaries. "/api" matches "/api", "/api/", "/api/x" and "/api?q" but NOT "/apix".
  nginx's ``location /api`` would match "/apix"; we choose segment boundaries because
  that is what people writing "/api" mean. A prefix ending in "/" ("/api/") matches
  "/api/" and below, not "/api". "/" (or "") matches every target, including the
  asterisk-form "*" of OPTIONS.
- Matching is on the raw bytes: no percent-decoding and no dot-segment removal, so
  "/%61pi" does not match "/api" and "/api/../x" does. The target is forwarded as is
  (apart from strip_prefix), so the upstream sees exactly what was matched.
- Absolute-form targets ("http://host/path", RFC 9112 §3.2.2) are the caller's to
  split with ``split_target`` before matching; ``match`` expects origin-form.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True, slots=True)
class Route:
    host: str            # "*", "api.example.com" or "*.example.com"
    path_prefix: str     # "/" or "/api" (segment-boundary prefix)
    pool: str
    strip_prefix: bool


# Host-pattern kinds, precomputed per route.
_ANY: Final = 0
_EXACT: Final = 1
_SUFFIX: Final = 2

# Normalized hosts cached per raw Host value: a handful of values repeat on every
# request. Bounded because the Host header is client-controlled.
_HOST_CACHE_MAX: Final = 1024


def _normalize_host(raw: bytes | str | None) -> str | None:
    """Lowercased host without port, brackets or trailing dot; None if absent or empty."""
    if raw is None:
        return None
    h = raw.decode("latin-1") if isinstance(raw, bytes) else raw
    h = h.strip().lower()
    if h.startswith("["):
        # IP-literal (RFC 3986 §3.2.2): "[v6]" optionally followed by ":port".
        end = h.find("]")
        h = h[1:end] if end > 0 else h[1:]
    elif h.count(":") == 1:
        # reg-name or IPv4 followed by ":port". More than one colon is a bare IPv6
        # address (not valid in Host, but accepted in patterns) and has no port.
        h = h.partition(":")[0]
    if h.endswith("."):
        h = h[:-1]
    return h or None


class Router:
    """Compiled route table. ``match`` is called once per request."""

    __slots__ = ("_table", "_needs_host", "_host_cache", "_catch_all")

    def __init__(self, routes: Sequence[Route]) -> None:
        table = []
        for r in routes:
            table.append((*_compile_host(r.host), *_compile_prefix(r.path_prefix), r))
        self._table: tuple[tuple[int, str, bool, bytes, bytes, Route], ...] = tuple(table)
        # With only "*" routes (the common single-site setup) the Host is never looked at.
        self._needs_host = any(kind != _ANY for kind, *_ in self._table)
        self._host_cache: dict[bytes | str, str | None] = {}
        # A first route for any host and every path (the single-site setup) always wins.
        first = self._table[0] if self._table else None
        self._catch_all = first[5] if first is not None and first[0] == _ANY and first[2] else None

    def match(self, host: bytes | str | None, path: bytes) -> Route | None:
        """The first route, in config order, matching ``host`` and origin-form ``path``."""
        if self._catch_all is not None:
            return self._catch_all
        q = path.find(b"?")
        if q >= 0:
            path = path[:q]
        h: str | None = None
        if self._needs_host and host is not None:
            cache = self._host_cache
            try:
                h = cache[host]
            except KeyError:
                h = _normalize_host(host)
                if len(cache) >= _HOST_CACHE_MAX:
                    cache.clear()
                cache[host] = h
        for kind, hv, match_all, prefix, prefix_slash, route in self._table:
            if kind != _ANY:
                if h is None:
                    continue
                if kind == _EXACT:
                    if h != hv:
                        continue
                # hv is ".example.com": require at least one label in front of it.
                elif len(h) <= len(hv) or not h.endswith(hv):
                    continue
            if match_all or path == prefix or path.startswith(prefix_slash):
                return route
        return None


def _compile_host(pattern: str) -> tuple[int, str]:
    p = pattern.strip().lower()
    if p in ("", "*"):
        return _ANY, ""
    if p.startswith("*."):
        suffix = _normalize_host(p[2:])
        if suffix is None or "*" in suffix:
            raise ValueError(f"bad host pattern {pattern!r}")
        return _SUFFIX, "." + suffix
    h = _normalize_host(p)
    if h is None or "*" in h:
        raise ValueError(f"bad host pattern {pattern!r}: '*' only as '*' or '*.domain'")
    return _EXACT, h


def _compile_prefix(prefix: str) -> tuple[bool, bytes, bytes]:
    if prefix in ("", "/"):
        return True, b"/", b"/"
    if not prefix.startswith("/"):
        raise ValueError(f"bad path_prefix {prefix!r}: must start with '/'")
    p = prefix.encode()
    # Segment boundary: "/api" matches "/api" itself or anything under "/api/".
    return False, p, p if p.endswith(b"/") else p + b"/"


def rewrite_target(route: Route, target: bytes) -> bytes:
    """The origin-form target to send upstream: with strip_prefix, the prefix removed.

    "/api/users?x=1" with prefix "/api" -> "/users?x=1"; "/api" -> "/"; "/api?x" ->
    "/?x". The query string is kept byte for byte. Without strip_prefix, or with prefix
    "/", or when the target does not start with the prefix, the target is returned
    unchanged (the same object).
    """
    prefix = route.path_prefix
    if not route.strip_prefix or prefix in ("", "/"):
        return target
    p = prefix.encode()
    if not target.startswith(p):
        return target
    rest = target[len(p):]
    # "" -> "/", "?x" -> "/?x", and "users" (prefix "/api/") -> "/users".
    if not rest.startswith(b"/"):
        rest = b"/" + rest
    return rest


_SCHEMES: Final = (b"http", b"https")


def split_target(target: bytes) -> tuple[bytes | None, bytes]:
    """(authority or None, origin-form target) for a request target (RFC 9112 §3.2).

    - origin-form "/p?q" and asterisk-form "*": (None, target) unchanged.
    - absolute-form "http://host:port/p?q": (b"host:port", b"/p?q"). The scheme is
      http or https, case-insensitively; an empty path becomes "/" ("http://h?q" ->
      "/?q", RFC 9112 §3.3). Per RFC 9112 §3.2.2 the caller must then route on this
      authority and ignore the Host header.

    Raises ValueError for anything else: another scheme, an empty host (RFC 9110
    §4.2.1), userinfo (RFC 9110 §4.2.4: recipients treat it as an error), a fragment,
    or authority-form (CONNECT, which is not proxied). The caller answers 400.
    """
    if target.startswith(b"/") or target == b"*":
        return None, target
    scheme, sep, rest = target.partition(b"://")
    if not sep or scheme.lower() not in _SCHEMES:
        raise ValueError("request target is neither origin-form nor http(s) absolute-form")
    if b"#" in rest:
        # absolute-URI has no fragment (RFC 9112 §3.2.2, RFC 3986 §4.3).
        raise ValueError("fragment in request target")
    end = len(rest)
    for delim in (b"/", b"?"):
        i = rest.find(delim)
        if 0 <= i < end:
            end = i
    authority, path = rest[:end], rest[end:]
    if b"@" in authority:
        raise ValueError("userinfo in request target")
    if not authority or authority.startswith(b":"):
        raise ValueError("empty host in request target")
    if not path.startswith(b"/"):
        path = b"/" + path
    return authority, path
