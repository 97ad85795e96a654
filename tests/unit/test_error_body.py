"""diagnostics/error_body.py: Accept negotiation and the three body formats."""

from __future__ import annotations

import orjson
import pytest

from diagnostics.error_body import CONTENT_TYPES, choose_format, render_body

FIREFOX = b"text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
CHROME = (b"text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,"
          b"image/apng,*/*;q=0.8,application/signed-exchange;v=b3;q=0.7")

NEGOTIATION = [
    (None, "json"),
    (b"", "json"),
    (b"*/*", "json"),                                  # curl
    (b"application/json", "json"),
    (b"application/json, text/plain, */*", "json"),   # axios
    (b"application/*", "json"),
    (b"text/plain", "text"),
    (b"text/plain, */*;q=0.5", "text"),
    (b"text/*", "text"),                               # tie between text offers: plain
    (b"text/html", "html"),
    (FIREFOX, "html"),
    (CHROME, "html"),
    (b"text/html, */*", "html"),                       # named beats wildcard at equal q
    (b"*/*, text/html", "html"),
    (b"text/html;q=0.5, application/json", "json"),
    (b"application/json;q=0.5, text/html", "html"),
    (b"text/html;q=0.9, text/plain", "text"),
    (b"TEXT/HTML", "html"),                            # media types are case-insensitive
    (b"text/html; Q=0.1, text/plain; q=0.2", "text"),
    (b"text/html;level=1", "html"),
    (b"text/html;q=0", "json"),                        # refused -> our default
    (b"*/*;q=0, text/plain", "text"),
    (b"image/png", "json"),                            # nothing acceptable -> default
    (b"application/xml", "json"),
    (b"application/json;q=0, text/html;q=0", "json"),
    (b"text/html, */*;q=0.8, text/plain;q=0.9", "html"),
    (b"*/*;q=0.1, text/plain;q=0.05", "json"),         # explicit low q beats the wildcard
    # junk never raises
    (b"garbage", "json"),
    (b",,,;;;", "json"),
    (b"text/html;q=abc", "json"),                      # junk q: the range is ignored
    (b"text/html;q=nan", "json"),
    (b"text/html;q=2", "json"),
    (b"text/html;q=-1", "json"),
    (b"text/plain;q=abc, text/html;q=0.4", "html"),
    (b"/html", "json"),
    (b"text/", "json"),
    (b"\xff\xfe\x00, text/html", "html"),
    (b"text/html" + b", x/y" * 10_000, "html"),
    (b";q=1", "json"),
]


@pytest.mark.parametrize(("accept", "expected"), NEGOTIATION)
def test_choose_format(accept: bytes | None, expected: str) -> None:
    assert choose_format(accept) == expected


ATTEMPTS = [
    {"server": "127.0.0.1:9001", "error": "connection_refused", "elapsed_ms": 0.3},
    {"server": "127.0.0.1:9002", "error": "connection_refused", "elapsed_ms": 12,
     "internal": "not for clients"},
]

FULL = dict(status=502, error="connection_refused", request_id="6f0c2a",
            details="connect ECONNREFUSED after 0.3 ms; 2 of 2 servers tried",
            hint="Nothing is listening on 127.0.0.1:9002. Is the service running, and on this port?",
            attempts=ATTEMPTS)


def test_json_full_matches_spec() -> None:
    content_type, body = render_body("json", **FULL)
    assert content_type == b"application/json"
    doc = orjson.loads(body)
    assert list(doc) == ["status", "error", "request_id", "details", "hint", "attempts", "debug"]
    assert doc["status"] == 502
    assert doc["error"] == "connection_refused"
    assert doc["request_id"] == "6f0c2a"
    assert doc["details"] == FULL["details"]
    assert doc["hint"] == FULL["hint"]
    assert doc["attempts"] == [
        {"server": "127.0.0.1:9001", "error": "connection_refused", "elapsed_ms": 0.3},
        {"server": "127.0.0.1:9002", "error": "connection_refused", "elapsed_ms": 12},
    ]
    assert doc["debug"] == "/debug/requests/6f0c2a"


def test_json_omits_none_values() -> None:
    _, body = render_body("json", status=404, error="destination_not_found", request_id="r1")
    assert orjson.loads(body) == {"status": 404, "error": "destination_not_found",
                                  "request_id": "r1", "debug": "/debug/requests/r1"}


def test_json_debug_path_is_quoted() -> None:
    _, body = render_body("json", status=500, error="proxy_internal_error", request_id="a/../b?c")
    assert orjson.loads(body)["debug"] == "/debug/requests/a%2F..%2Fb%3Fc"


def test_json_survives_lone_surrogates() -> None:
    _, body = render_body("json", status=502, error="http_protocol_error", request_id="r",
                          details="bytes \udcff here")
    assert orjson.loads(body)["details"] == "bytes ? here"


@pytest.mark.parametrize("fmt", ["json", "text", "html"])
def test_content_types(fmt: str) -> None:
    content_type, _ = render_body(fmt, status=502, error="connection_refused", request_id="r")
    assert content_type == CONTENT_TYPES[fmt]
    if fmt != "json":
        assert content_type.endswith(b"; charset=utf-8")


@pytest.mark.parametrize("fmt", ["json", "text", "html"])
def test_minimal_leaks_nothing(fmt: str) -> None:
    _, body = render_body(fmt, **FULL, minimal=True)
    text = body.decode()
    for secret in ("ECONNREFUSED", "127.0.0.1", "9001", "9002", "Nothing is listening",
                   "elapsed", "ms", "attempts", "debug", "hint", "details"):
        assert secret not in text, (fmt, secret, text)
    assert "502" in text and "connection_refused" in text and "6f0c2a" in text


def test_json_minimal_has_exactly_three_keys() -> None:
    _, body = render_body("json", **FULL, minimal=True)
    assert orjson.loads(body) == {"status": 502, "error": "connection_refused",
                                  "request_id": "6f0c2a"}


def test_text_full() -> None:
    _, body = render_body("text", **FULL)
    assert body.decode() == (
        "502 connection_refused\n"
        "request id: 6f0c2a\n"
        "details: connect ECONNREFUSED after 0.3 ms; 2 of 2 servers tried\n"
        "hint: Nothing is listening on 127.0.0.1:9002. Is the service running, and on this port?\n"
        "attempts:\n"
        "  127.0.0.1:9001 connection_refused 0.3 ms\n"
        "  127.0.0.1:9002 connection_refused 12.0 ms\n"
        "debug: /debug/requests/6f0c2a\n"
    )


def test_text_minimal() -> None:
    _, body = render_body("text", **FULL, minimal=True)
    assert body == b"502 connection_refused\nrequest id: 6f0c2a\n"


def test_text_values_cannot_fake_lines() -> None:
    _, body = render_body("text", status=502, error="http_protocol_error", request_id="r",
                          details="one\ntwo\r\nrequest id: forged")
    lines = body.decode().splitlines()
    assert lines[2] == "details: one two request id: forged"
    assert sum(line.startswith("request id:") for line in lines) == 1


def test_html_escapes_everything() -> None:
    evil = '<script>alert("x")</script>'
    _, body = render_body("html", status=502, error="connection_refused", request_id=evil,
                          details=evil, hint=evil,
                          attempts=[{"server": evil, "error": evil, "elapsed_ms": 1.0}])
    page = body.decode()
    assert "<script" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert page.startswith("<!doctype html>")
    assert '<meta charset="utf-8">' in page


def test_html_full_shows_everything() -> None:
    _, body = render_body("html", **FULL)
    page = body.decode()
    for expected in ("502 connection_refused", "ECONNREFUSED", "Nothing is listening",
                     "127.0.0.1:9001", "0.3 ms", "6f0c2a", "/debug/requests/6f0c2a"):
        assert expected in page
    assert "not for clients" not in page


def test_unknown_format_is_rejected() -> None:
    with pytest.raises(ValueError):
        render_body("xml", status=500, error="proxy_internal_error", request_id="r")
