"""A strict RFC 8941 (Structured Field Values) List parser, for tests only.

It follows the parsing algorithms of RFC 8941 §4.2 step by step and raises ValueError
on anything that does not conform, so a test that parses our Proxy-Status output with it
proves the output is a valid List, not merely that it looks right.

Types returned:
- Integer -> int, Decimal -> float, String -> str, Token -> Token (a str subclass, so
  tests can tell `error=foo` from `error="foo"`), Byte Sequence -> bytes, Boolean -> bool.
- A member is `(item, params)`; an Inner List member is `([(item, params), ...], params)`.
- Parameters are a dict in wire order; a repeated key keeps its first position and its
  last value (§4.2.3.2).

Not supported: Dates and Display Strings (RFC 9651 additions); they fail like any other
unknown item, which is right for RFC 8941.
"""

from __future__ import annotations

import base64
import binascii
import string

__all__ = ["Token", "parse_list"]


class Token(str):
    """An sf-token (RFC 8941 §3.3.4), distinct from an sf-string of the same text."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Token({str.__repr__(self)})"


_DIGITS = frozenset(string.digits)
_ALPHA = frozenset(string.ascii_letters)
_LCALPHA = frozenset(string.ascii_lowercase)
# RFC 9110 §5.6.2 tchar
_TCHAR = frozenset("!#$%&'*+-.^_`|~") | _DIGITS | _ALPHA
_TOKEN_CHARS = _TCHAR | {":", "/"}
_KEY_CHARS = _LCALPHA | _DIGITS | {"_", "-", ".", "*"}
_BASE64_CHARS = frozenset(string.ascii_letters + string.digits + "+/=")


class _Input:
    """The input string with a cursor; every step consumes from the front (§4.2)."""

    __slots__ = ("text", "pos")

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def empty(self) -> bool:
        return self.pos >= len(self.text)

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def take(self) -> str:
        if self.empty():
            raise ValueError("unexpected end of input")
        char = self.text[self.pos]
        self.pos += 1
        return char

    def skip(self, chars: str) -> None:
        while self.peek() and self.peek() in chars:
            self.pos += 1

    def fail(self, why: str) -> ValueError:
        return ValueError(f"{why} at offset {self.pos} in {self.text!r}")


def parse_list(text: str) -> list:
    """Parse an RFC 8941 List field value (§4.2 with §4.2.1); ValueError if invalid."""
    # §4.2 step 2: the field value must be ASCII.
    if not text.isascii():
        raise ValueError(f"non-ASCII input: {text!r}")
    inp = _Input(text)
    inp.skip(" ")  # §4.2 step 3: discard leading SP
    members = _list(inp)
    inp.skip(" ")  # §4.2 step 6: discard trailing SP
    if not inp.empty():  # §4.2 step 7
        raise inp.fail("trailing characters")
    return members


def _list(inp: _Input) -> list:
    # §4.2.1
    members = []
    while not inp.empty():
        members.append(_item_or_inner_list(inp))
        inp.skip(" \t")  # OWS
        if inp.empty():
            return members
        if inp.take() != ",":
            raise inp.fail("expected ',' between list members")
        inp.skip(" \t")
        if inp.empty():
            raise inp.fail("trailing comma")
    return members


def _item_or_inner_list(inp: _Input):
    # §4.2.1.1
    if inp.peek() == "(":
        return _inner_list(inp)
    return _item(inp)


def _inner_list(inp: _Input):
    # §4.2.1.2
    if inp.take() != "(":
        raise inp.fail("expected '('")
    items = []
    while not inp.empty():
        inp.skip(" ")
        if inp.peek() == ")":
            inp.take()
            return items, _parameters(inp)
        items.append(_item(inp))
        if inp.peek() not in (" ", ")"):
            raise inp.fail("expected SP or ')' in inner list")
    raise inp.fail("unterminated inner list")


def _item(inp: _Input):
    # §4.2.3
    bare = _bare_item(inp)
    return bare, _parameters(inp)


def _bare_item(inp: _Input):
    # §4.2.3.1
    char = inp.peek()
    if char and (char == "-" or char in _DIGITS):
        return _number(inp)
    if char == '"':
        return _string(inp)
    if char and (char in _ALPHA or char == "*"):
        return _token(inp)
    if char == ":":
        return _byte_sequence(inp)
    if char == "?":
        return _boolean(inp)
    raise inp.fail("expected a bare item")


def _parameters(inp: _Input) -> dict:
    # §4.2.3.2
    params: dict = {}
    while inp.peek() == ";":
        inp.take()
        inp.skip(" ")
        key = _key(inp)
        value = True
        if inp.peek() == "=":
            inp.take()
            value = _bare_item(inp)
        params[key] = value
    return params


def _key(inp: _Input) -> str:
    # §4.2.3.3
    char = inp.peek()
    if not char or not (char in _LCALPHA or char == "*"):
        raise inp.fail("key must start with lcalpha or '*'")
    start = inp.pos
    while inp.peek() and inp.peek() in _KEY_CHARS:
        inp.pos += 1
    return inp.text[start:inp.pos]


def _number(inp: _Input) -> int | float:
    # §4.2.4
    sign = 1
    if inp.peek() == "-":
        inp.take()
        sign = -1
    if not inp.peek() or inp.peek() not in _DIGITS:
        raise inp.fail("number must start with a digit")
    digits = ""
    is_decimal = False
    while not inp.empty():
        char = inp.peek()
        if char in _DIGITS:
            digits += inp.take()
        elif not is_decimal and char == ".":
            if len(digits) > 12:
                raise inp.fail("decimal integer part longer than 12 digits")
            digits += inp.take()
            is_decimal = True
        else:
            break
        if not is_decimal and len(digits) > 15:
            raise inp.fail("integer longer than 15 digits")
        if is_decimal and len(digits) > 16:
            raise inp.fail("decimal longer than 16 characters")
    if not is_decimal:
        return sign * int(digits)
    if digits.endswith("."):
        raise inp.fail("decimal ends with '.'")
    if len(digits.split(".")[1]) > 3:
        raise inp.fail("decimal with more than 3 fractional digits")
    return sign * float(digits)


def _string(inp: _Input) -> str:
    # §4.2.5
    if inp.take() != '"':
        raise inp.fail("expected '\"'")
    out = []
    while not inp.empty():
        char = inp.take()
        if char == "\\":
            if inp.empty():
                raise inp.fail("backslash at end of input")
            escaped = inp.take()
            if escaped not in ('"', "\\"):
                raise inp.fail(f"bad escape \\{escaped}")
            out.append(escaped)
        elif char == '"':
            return "".join(out)
        elif not "\x20" <= char <= "\x7e":
            raise inp.fail(f"character {char!r} not allowed in a string")
        else:
            out.append(char)
    raise inp.fail("unterminated string")


def _token(inp: _Input) -> Token:
    # §4.2.6
    char = inp.peek()
    if not char or not (char in _ALPHA or char == "*"):
        raise inp.fail("token must start with ALPHA or '*'")
    start = inp.pos
    while inp.peek() and inp.peek() in _TOKEN_CHARS:
        inp.pos += 1
    return Token(inp.text[start:inp.pos])


def _byte_sequence(inp: _Input) -> bytes:
    # §4.2.7
    if inp.take() != ":":
        raise inp.fail("expected ':'")
    end = inp.text.find(":", inp.pos)
    if end < 0:
        raise inp.fail("unterminated byte sequence")
    content = inp.text[inp.pos:end]
    inp.pos = end + 1
    if not set(content) <= _BASE64_CHARS:
        raise inp.fail("byte sequence has non-base64 characters")
    # §4.2.7 step 7: parsers SHOULD NOT fail when "=" padding is missing.
    content += "=" * (-len(content) % 4)
    try:
        return base64.b64decode(content, validate=True)
    except binascii.Error as exc:
        raise inp.fail(f"bad base64 ({exc})") from None


def _boolean(inp: _Input) -> bool:
    # §4.2.8
    if inp.take() != "?":
        raise inp.fail("expected '?'")
    char = inp.take() if not inp.empty() else ""
    if char == "1":
        return True
    if char == "0":
        return False
    raise inp.fail("boolean must be ?0 or ?1")
