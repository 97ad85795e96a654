"""The body of every response gatewise generates instead of the upstream.

Three forms, picked from the request's Accept header (RFC 9110 §12.5.1):
- JSON (the default: scripts, curl's `*/*`, no Accept at all), keys exactly as in SPEC;
- text/plain, a few readable lines, when the client prefers it;
- text/html, a tiny self-contained page, when the client prefers it (browsers).

Rules:
- Never fail on the way out: junk in Accept is ignored, never raised on, and strings that
  cannot be encoded (lone surrogates) are replaced rather than dropped with the response.
- `minimal=True` (SPEC `detail = "minimal"`) shows only status, error and request id, in
  every form: nothing about servers, hints or timings leaks.
- Every value interpolated into HTML goes through html.escape.
- Pure: no I/O, no config.
"""

from __future__ import annotations

import html
from urllib.parse import quote

import orjson

CONTENT_TYPES: dict[str, bytes] = {
    "json": b"application/json",  # RFC 8259 §11: no charset parameter for JSON
    "text": b"text/plain; charset=utf-8",
    "html": b"text/html; charset=utf-8",
}

# Media type -> our format. Order breaks ties: on equal preference JSON wins (it is the
# documented default), then plain text, then HTML.
_OFFERS: tuple[tuple[str, str, str], ...] = (
    ("application", "json", "json"),
    ("text", "plain", "text"),
    ("text", "html", "html"),
)

# Bound the work spent on a hostile Accept header; real ones have a handful of ranges.
_MAX_RANGES = 64


def _parse_q(params: list[str]) -> float | None:
    """The q weight of one media range (RFC 9110 §12.4.2), or None when it is junk."""
    for param in params:
        name, sep, value = param.partition("=")
        if sep and name.strip().lower() == "q":
            try:
                q = float(value.strip())
            except ValueError:
                return None
            # float() also takes "nan", "inf" and "1e0"; the grammar allows 0..1 only.
            return q if 0.0 <= q <= 1.0 else None
    return 1.0


def choose_format(accept: bytes | None) -> str:
    """"json", "text" or "html" for this Accept header value.

    Each offer gets the weight of the most specific range that matches it (RFC 9110
    §12.5.1: `text/html` beats `text/*` beats `*/*`). The highest weight wins; on equal
    weight an offer named explicitly beats one reached through a wildcard, then JSON
    beats text beats HTML. When nothing acceptable is offered we answer JSON anyway
    rather than 406 (§12.5.1 allows ignoring the header).
    """
    if not accept:
        return "json"
    # Field values are octets; latin-1 maps every byte, so decoding cannot fail.
    ranges = accept.decode("latin-1").split(",", _MAX_RANGES)[:_MAX_RANGES]
    # offer -> (specificity of the best match so far, its q)
    best: dict[str, tuple[int, float]] = {}
    for media_range in ranges:
        media, *params = media_range.split(";")
        type_, sep, subtype = media.strip().lower().partition("/")
        if not sep or not type_ or not subtype:
            continue
        q = _parse_q(params)
        if q is None:
            continue
        for offer_type, offer_subtype, fmt in _OFFERS:
            if type_ == offer_type and subtype == offer_subtype:
                specificity = 2
            elif type_ == offer_type and subtype == "*":
                specificity = 1
            elif type_ == "*" and subtype == "*":
                specificity = 0
            else:
                continue
            if fmt not in best or specificity > best[fmt][0]:
                best[fmt] = (specificity, q)
    chosen, chosen_key = "json", None
    for rank, (_, _, fmt) in enumerate(_OFFERS):
        if fmt not in best:
            continue
        specificity, q = best[fmt]
        key = (q, specificity, -rank)
        if q > 0.0 and (chosen_key is None or key > chosen_key):
            chosen, chosen_key = fmt, key
    return chosen


def render_body(fmt: str, *, status: int, error: str, request_id: str, details: str | None = None,
                hint: str | None = None, attempts: list[dict] | None = None,
                minimal: bool = False) -> tuple[bytes, bytes]:
    """(content_type, body) for an error response in the chosen format.

    `attempts` items are dicts with "server", "error" and "elapsed_ms" (other keys are
    ignored, so internal bookkeeping never reaches the client).
    """
    if minimal:
        details = hint = attempts = None
    if attempts is not None:
        attempts = [{key: a[key] for key in ("server", "error", "elapsed_ms") if key in a}
                    for a in attempts]
    if fmt == "json":
        body = _json(status, error, request_id, details, hint, attempts, minimal)
    elif fmt == "text":
        body = _text(status, error, request_id, details, hint, attempts, minimal)
    elif fmt == "html":
        body = _html(status, error, request_id, details, hint, attempts, minimal)
    else:
        raise ValueError(f"unknown error body format {fmt!r}")
    return CONTENT_TYPES[fmt], body


def _debug_path(request_id: str) -> str:
    # Request ids are taken from clients when "sane"; quoting keeps the path a path anyway.
    return "/debug/requests/" + quote(request_id, safe="")


def _json(status: int, error: str, request_id: str, details: str | None, hint: str | None,
          attempts: list[dict] | None, minimal: bool) -> bytes:
    doc: dict = {"status": status, "error": error, "request_id": request_id}
    if not minimal:
        # SPEC key order; keys whose value is None are left out.
        doc["details"] = details
        doc["hint"] = hint
        doc["attempts"] = attempts
        doc["debug"] = _debug_path(request_id)
        doc = {key: value for key, value in doc.items() if value is not None}
    try:
        return orjson.dumps(doc)
    except orjson.JSONEncodeError:
        # Only strings with lone surrogates (from surrogateescape-decoded bytes) get here.
        return orjson.dumps(_scrub(doc))


def _scrub(value):
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, dict):
        return {_scrub(k): _scrub(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    return value


def _one_line(value: object) -> str:
    # Text bodies are read line by line; a newline inside a value must not fake a line.
    return " ".join(str(value).split())


def _elapsed(attempt: dict) -> str:
    ms = attempt.get("elapsed_ms")
    return f"{ms:.1f} ms" if isinstance(ms, (int, float)) else ""


def _text(status: int, error: str, request_id: str, details: str | None, hint: str | None,
          attempts: list[dict] | None, minimal: bool) -> bytes:
    lines = [f"{status} {_one_line(error)}", f"request id: {_one_line(request_id)}"]
    if details is not None:
        lines.append(f"details: {_one_line(details)}")
    if hint is not None:
        lines.append(f"hint: {_one_line(hint)}")
    if attempts:
        lines.append("attempts:")
        for a in attempts:
            fields = (a.get("server", "?"), a.get("error", "?"), _elapsed(a))
            lines.append("  " + " ".join(_one_line(f) for f in fields if f != ""))
    if not minimal:
        lines.append(f"debug: {_debug_path(request_id)}")
    return ("\n".join(lines) + "\n").encode("utf-8", "replace")


def _html(status: int, error: str, request_id: str, details: str | None, hint: str | None,
          attempts: list[dict] | None, minimal: bool) -> bytes:
    e = html.escape  # quote=True: safe in text and in attribute values alike
    title = f"{status} {e(error)}"
    parts = [
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>{title}</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:50em}"
        "code{background:#f3f3f3;padding:0 .2em}td{padding:0 1em 0 0}</style>",
        f"</head><body>\n<h1>{title}</h1>\n",
    ]
    if details is not None:
        parts.append(f"<p>{e(details)}</p>\n")
    if hint is not None:
        parts.append(f"<p><strong>Hint:</strong> {e(hint)}</p>\n")
    if attempts:
        parts.append("<table><tr><th>server</th><th>error</th><th>elapsed</th></tr>\n")
        for a in attempts:
            parts.append(f"<tr><td>{e(str(a.get('server', '?')))}</td>"
                         f"<td>{e(str(a.get('error', '?')))}</td>"
                         f"<td>{e(_elapsed(a))}</td></tr>\n")
        parts.append("</table>\n")
    parts.append(f"<p>Request id: <code>{e(request_id)}</code></p>\n")
    if not minimal:
        parts.append(f"<p>Debug: <code>{e(_debug_path(request_id))}</code>"
                     " on the admin listener</p>\n")
    parts.append("</body></html>\n")
    return "".join(parts).encode("utf-8", "replace")
