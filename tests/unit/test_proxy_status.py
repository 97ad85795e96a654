"""diagnostics/proxy_status.py: every member we emit is one valid RFC 8941 list member.

Each rendered value is parsed back with the strict test parser (tests/sfparse.py), so
"valid" means valid per RFC 8941 §4.2, not "looks right".
"""

from __future__ import annotations

import pytest

from diagnostics.causes import INFO, Cause
from diagnostics.proxy_status import (MAX_STRING_CHARS, append, is_token, render, render_cause,
                                      sf_string)
from tests.sfparse import Token, parse_list


def parse_one(value: bytes) -> tuple[object, dict]:
    """Parse a Proxy-Status value that must hold exactly one member."""
    assert isinstance(value, bytes)
    members = parse_list(value.decode("ascii"))
    assert len(members) == 1, members
    return members[0]


def assert_safe_header_value(value: bytes) -> None:
    assert all(0x20 <= b <= 0x7E for b in value), value


@pytest.mark.parametrize("cause", list(Cause))
def test_every_cause_renders_and_parses_back(cause: Cause) -> None:
    value = render_cause("gatewise", cause, next_hop="127.0.0.1:9002",
                         details="connect ECONNREFUSED after 0.3 ms; 2 of 2 servers tried")
    name, params = parse_one(value)
    assert name == Token("gatewise") and isinstance(name, Token)
    assert list(params) == ["error", "next-hop", "details"]  # RFC 9209 order we promise
    assert isinstance(params["error"], Token)
    assert params["error"] == INFO[cause].token
    assert params["next-hop"] == "127.0.0.1:9002" and not isinstance(params["next-hop"], Token)
    assert params["details"] == "connect ECONNREFUSED after 0.3 ms; 2 of 2 servers tried"


def test_spec_example_is_byte_exact() -> None:
    value = render_cause("gatewise", Cause.CONNECT_REFUSED, next_hop="127.0.0.1:9002",
                         details="connect ECONNREFUSED after 0.3 ms")
    assert value == (b'gatewise; error=connection_refused; next-hop="127.0.0.1:9002"; '
                     b'details="connect ECONNREFUSED after 0.3 ms"')


@pytest.mark.parametrize("cause", list(Cause))
def test_minimal_has_only_the_error(cause: Cause) -> None:
    value = render_cause("gatewise", cause, next_hop="10.0.0.7:8080",
                         details="secret internal detail", minimal=True)
    assert value == f"gatewise; error={INFO[cause].token}".encode()
    _, params = parse_one(value)
    assert params == {"error": Token(INFO[cause].token)}


def test_render_cause_without_optional_params() -> None:
    assert render_cause("gatewise", Cause.NO_ROUTE) == b"gatewise; error=destination_not_found"


HOSTILE_DETAILS = [
    'say "hello"',
    "C:\\path\\to\\thing",
    '\\"',
    'ends with backslash \\',
    "line one\nline two",
    "bad\r\nX-Evil: 1",
    "\r\n\r\nHTTP/1.1 200 OK\r\n",
    "nul\x00byte and del\x7f and tab\t",
    "unicode: caf\u00e9 \u2603 \U0001F600",
    "lone surrogate \udcff",
    "",
    ";,=()",
]


@pytest.mark.parametrize("details", HOSTILE_DETAILS)
def test_hostile_details_stay_one_valid_member(details: str) -> None:
    value = render_cause("gatewise", Cause.CONNECTION_TERMINATED, next_hop="a:1", details=details)
    assert_safe_header_value(value)
    assert b"\r" not in value and b"\n" not in value
    name, params = parse_one(value)
    assert name == "gatewise"
    assert set(params) == {"error", "next-hop", "details"}
    parsed = params["details"]
    assert len(parsed) == len(details)  # one replacement character per bad character
    for original, got in zip(details, parsed):
        assert got == (original if 0x20 <= ord(original) <= 0x7E else "?")


def test_quotes_and_backslashes_round_trip_exactly() -> None:
    details = 'a "quoted" \\ and \\" mix'
    _, params = parse_one(render("gatewise", error="http_protocol_error", details=details))
    assert params["details"] == details


def test_header_injection_attempt_is_neutralised() -> None:
    value = render("gatewise", error="connection_terminated", details="x\r\nX-Evil: 1")
    assert value == b'gatewise; error=connection_terminated; details="x??X-Evil: 1"'


def test_hostile_next_hop() -> None:
    value = render("gatewise", error="dns_error", next_hop='evil"\r\nhost\\')
    _, params = parse_one(value)
    assert params["next-hop"] == 'evil"??host\\'


def test_ipv6_next_hop_is_a_string() -> None:
    _, params = parse_one(render("gatewise", error="connection_refused", next_hop="[::1]:9001"))
    assert params["next-hop"] == "[::1]:9001"


def test_long_details_are_truncated() -> None:
    _, params = parse_one(render("gatewise", error="http_protocol_error", details="x" * 100_000))
    assert len(params["details"]) == MAX_STRING_CHARS
    assert params["details"].endswith("...")


def test_received_status_is_an_integer() -> None:
    value = render("gatewise", next_hop="127.0.0.1:9001", received_status=502)
    assert value == b'gatewise; next-hop="127.0.0.1:9001"; received-status=502'
    name, params = parse_one(value)
    assert params == {"next-hop": "127.0.0.1:9001", "received-status": 502}
    assert type(params["received-status"]) is int


def test_param_order_with_everything() -> None:
    value = render("gatewise", error="http_response_incomplete", next_hop="h:1", details="d",
                   received_status=200, extra=(("attempts", 2), ("x-note", "n"), ("flag", True)))
    _, params = parse_one(value)
    assert list(params) == ["error", "next-hop", "received-status", "details",
                            "attempts", "x-note", "flag"]
    assert params["attempts"] == 2 and params["x-note"] == "n" and params["flag"] is True


@pytest.mark.parametrize("name", ["gatewise", "edge-1", "proxy.example.com", "*p", "a:b/c"])
def test_token_proxy_names(name: str) -> None:
    value = render(name, error="connection_refused")
    parsed, _ = parse_one(value)
    assert isinstance(parsed, Token) and parsed == name


@pytest.mark.parametrize("name", ["my proxy", "1proxy", "", 'q"uote', "caf\u00e9", "a\r\nb", "x,y"])
def test_non_token_proxy_names_become_strings(name: str) -> None:
    value = render(name, error="connection_refused")
    assert_safe_header_value(value)
    parsed, params = parse_one(value)
    assert not isinstance(parsed, Token)
    assert params == {"error": Token("connection_refused")}
    assert parsed == "".join(c if 0x20 <= ord(c) <= 0x7E else "?" for c in name)


def test_render_cause_with_non_token_name() -> None:
    value = render_cause("edge proxy", Cause.CONNECT_TIMEOUT, minimal=True)
    assert value == b'"edge proxy"; error=connection_timeout'


@pytest.mark.parametrize("bad", ["", "Bad Token", "1abc", "a\r\nb"])
def test_invalid_error_token_is_a_programming_error(bad: str) -> None:
    with pytest.raises(ValueError):
        render("gatewise", error=bad)


@pytest.mark.parametrize("key", ["Upper", "1x", "", "error", "details", "next-hop", "a b"])
def test_invalid_or_reserved_extra_keys_are_rejected(key: str) -> None:
    with pytest.raises(ValueError):
        render("gatewise", error="connection_refused", extra=((key, 1),))


@pytest.mark.parametrize("n", [10**15, -(10**15)])
def test_out_of_range_integers_are_rejected(n: int) -> None:
    with pytest.raises(ValueError):
        render("gatewise", received_status=n)


def test_append_keeps_the_upstreams_member_first() -> None:
    ours = render_cause("gatewise", Cause.CONNECT_REFUSED, next_hop="b:2")
    combined = append(b'inner-proxy; error=connection_timeout; next-hop="a:1"', ours)
    members = parse_list(combined.decode("ascii"))
    assert [m[0] for m in members] == ["inner-proxy", "gatewise"]
    assert members[0][1]["error"] == "connection_timeout"
    assert members[1][1]["error"] == "connection_refused"


def test_append_to_several_upstream_members() -> None:
    ours = render("gatewise", next_hop="c:3", received_status=503)
    combined = append(b'origin-lb; received-status=503, "mid proxy"; error=http_response_timeout  ',
                      ours)
    members = parse_list(combined.decode("ascii"))
    assert [m[0] for m in members] == ["origin-lb", "mid proxy", "gatewise"]
    assert members[-1][1] == {"next-hop": "c:3", "received-status": 503}


@pytest.mark.parametrize("existing", [None, b"", b"   ", b"\t"])
def test_append_to_nothing_is_just_our_member(existing: bytes | None) -> None:
    ours = render_cause("gatewise", Cause.NO_ROUTE)
    assert append(existing, ours) == ours


def test_every_info_token_renders_as_a_bare_token() -> None:
    for info in INFO.values():
        assert is_token(info.token)
        assert render("gatewise", error=info.token).endswith(f"error={info.token}".encode())


def test_sf_string_escaping_rules() -> None:
    assert sf_string("plain") == '"plain"'
    assert sf_string('a"b') == '"a\\"b"'
    assert sf_string("a\\b") == '"a\\\\b"'
    assert sf_string("a\nb\u00e9") == '"a?b?"'
