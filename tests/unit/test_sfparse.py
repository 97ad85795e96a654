"""Conformance cases for the test-only RFC 8941 List parser (tests/sfparse.py).

The cases follow the RFC's own examples and the shape of the httpwg
structured-field-tests suite, so tests that lean on the parser can trust it.
"""

from __future__ import annotations

import pytest

from tests.sfparse import Token, parse_list

T = Token

VALID = [
    # empty and whitespace
    ("", []),
    ("   ", []),
    # tokens and strings
    ("foo", [(T("foo"), {})]),
    ("*foo", [(T("*foo"), {})]),
    ("a:b/c!#$%&'*+-.^_`|~9", [(T("a:b/c!#$%&'*+-.^_`|~9"), {})]),
    ("Foo", [(T("Foo"), {})]),  # tokens, unlike keys, may be uppercase
    ('"foo bar"', [("foo bar", {})]),
    ('""', [("", {})]),
    (r'"a \"quoted\" \\ back"', [('a "quoted" \\ back', {})]),
    ('" ~"', [(" ~", {})]),
    # numbers (§3.3.1, §3.3.2)
    ("42", [(42, {})]),
    ("-42", [(-42, {})]),
    ("0", [(0, {})]),
    ("-0", [(0, {})]),
    ("00042", [(42, {})]),
    ("999999999999999", [(999_999_999_999_999, {})]),
    ("-999999999999999", [(-999_999_999_999_999, {})]),
    ("1.5", [(1.5, {})]),
    ("-1.125", [(-1.125, {})]),
    ("123456789012.123", [(123456789012.123, {})]),
    # booleans and byte sequences
    ("?1", [(True, {})]),
    ("?0", [(False, {})]),
    (":aGVsbG8=:", [(b"hello", {})]),
    (":aGVsbG8:", [(b"hello", {})]),  # §4.2.7: missing padding is tolerated
    ("::", [(b"", {})]),
    # lists and whitespace rules (§4.2.1: OWS around commas)
    ("a, b,c ,\td", [(T("a"), {}), (T("b"), {}), (T("c"), {}), (T("d"), {})]),
    ("  a , b  ", [(T("a"), {}), (T("b"), {})]),
    ("a\t", [(T("a"), {})]),  # §4.2.1 discards OWS after a member, HTAB included
    # parameters
    ("a;b", [(T("a"), {"b": True})]),
    ("a; b=1;c=?0", [(T("a"), {"b": 1, "c": False})]),
    ('a;k="v";*x=tok;y.z-_9=1.5', [(T("a"), {"k": "v", "*x": T("tok"), "y.z-_9": 1.5})]),
    ("a;k=1;k=2", [(T("a"), {"k": 2})]),  # §4.2.3.2: a repeated key overwrites
    # the shape we emit for Proxy-Status (RFC 9209 §2)
    ('gatewise; error=connection_refused; next-hop="127.0.0.1:9002"; received-status=502',
     [(T("gatewise"), {"error": T("connection_refused"), "next-hop": "127.0.0.1:9002",
                       "received-status": 502})]),
    # inner lists (§3.1.1)
    ("(a b);p=1", [([(T("a"), {}), (T("b"), {})], {"p": 1})]),
    ("()", [([], {})]),
    ("( a  b )", [([(T("a"), {}), (T("b"), {})], {})]),
    ('(1;x "s"), c', [([(1, {"x": True}), ("s", {})], {}), (T("c"), {})]),
]

INVALID = [
    # list structure
    "a,",            # trailing comma
    ",a",            # leading comma
    "a,,b",          # empty member
    "a b",           # two items without a comma
    "\ta",           # leading HTAB (only SP is discarded)
    "a;",            # parameter without key
    # strings
    '"abc',          # unterminated
    '"a\\n"',        # bad escape (only \" and \\ allowed)
    '"a\\',          # escape at end
    '"a\nb"',        # raw newline
    '"a\rb"',        # raw CR
    '"a\x00"',       # NUL
    '"a\x7f"',       # DEL
    '"\u00e9"',      # non-ASCII
    'é',             # non-ASCII outside a string
    '"a"x',          # junk after a string
    # tokens and keys
    "1a",            # a number followed by junk
    "-a",            # '-' not followed by a digit
    "a;Key=1",       # uppercase key
    "a;1k=1",        # key starting with a digit
    "a;-k=1",        # key starting with '-'
    "a;k=",          # missing value
    "a;k=(1)",       # inner list as parameter value
    "a@b",           # '@' is not a tchar
    "a=b",           # '=' outside parameters
    "_a",            # token must start with ALPHA or '*'
    "@1659578233",   # RFC 9651 Date is not RFC 8941
    '%"x"',          # RFC 9651 Display String is not RFC 8941
    # numbers
    "1234567890123456",          # 16 digits
    "1.",                        # decimal ending in '.'
    "1.2345",                    # 4 fractional digits
    "1234567890123.1",           # 13 integer digits in a decimal
    "1.2.3",
    "--1",
    # booleans and byte sequences
    "?2",
    "?",
    ":aGVsbG8=",     # unterminated
    ":aGV sbG8=:",   # space in base64
    ":aGVs*G8=:",    # not base64
    # inner lists
    "(a b",
    "(a,b)",
    "(a)b",
    "(a)(b)",
]


@pytest.mark.parametrize(("text", "expected"), VALID)
def test_valid(text: str, expected: list) -> None:
    assert parse_list(text) == expected


@pytest.mark.parametrize("text", INVALID)
def test_invalid(text: str) -> None:
    with pytest.raises(ValueError):
        parse_list(text)


def test_token_and_string_are_distinguished() -> None:
    [(token, _)] = parse_list("foo")
    [(string, _)] = parse_list('"foo"')
    assert isinstance(token, Token)
    assert not isinstance(string, Token)
    assert token == string == "foo"


def test_boolean_is_not_an_integer() -> None:
    [(_, params)] = parse_list("a;b=?1;c=1")
    assert params["b"] is True
    assert type(params["c"]) is int


def test_parameter_order_is_kept() -> None:
    [(_, params)] = parse_list("a;z=1;b=2;m=3")
    assert list(params) == ["z", "b", "m"]
