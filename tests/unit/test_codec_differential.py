"""Differential test of the two codec adapters (no sockets).

Every raw message below is fed to the llhttp adapter and to the h11 adapter, whole and
byte by byte, through a recording handler. The two must agree: both accept with the same
messages (method, target, version, header list, body bytes, trailers, keep-alive,
upgrade, tunnel bytes) or both reject with the same ClientFault (request side) or
ProxyError (response side), after the same complete messages. Where a case also has a
right answer (a smuggling vector must be rejected), that is asserted as well.

Where they disagree, the case carries xfail(strict=True) with the finding as the reason:
a disagreement is a place where gatewise behaves differently depending on `parser`, and
the strict mark turns red as soon as someone fixes it (then drop the mark).

One normalisation: h11 lower-cases Transfer-Encoding values ("Chunked" -> "chunked");
transfer codings are case-insensitive (RFC 9112 §7), so that value is compared lower-cased.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import pytest

from proxy.codec import make_request_parser, make_response_parser
from proxy.codec.base import RequestHandler, ResponseHandler
from proxy.codec.llhttp import _RAW_SLACK
from proxy.errors import ClientFault, ProxyError, RequestHeadersTooLarge

MAX_HEAD = 65536
CODECS = ("llhttp", "h11")


# -- request side ---------------------------------------------------------------------------------
@dataclass
class Message:
    head: tuple
    body: bytearray = field(default_factory=bytearray)
    trailers: list | None = None  # None: the message did not end

    def key(self) -> tuple:
        return (self.head, bytes(self.body), self.trailers)


def _norm_headers(headers) -> list[tuple[bytes, bytes]]:
    out = []
    for name, value in headers:
        if name.lower() == b"transfer-encoding":
            value = value.lower()
        out.append((bytes(name), bytes(value)))
    return out


class RequestRecorder(RequestHandler):
    def __init__(self) -> None:
        self.messages: list[Message] = []

    def on_request_head(self, head) -> None:
        self.messages.append(Message((head.method, head.target, head.version, _norm_headers(head.headers),
                                      head.keep_alive, head.upgrade)))

    def on_request_body(self, data: bytes) -> None:
        self.messages[-1].body += data

    def on_request_end(self, trailers) -> None:
        self.messages[-1].trailers = _norm_headers(trailers)


def _pieces(data: bytes, split: bool) -> list[bytes]:
    return [data[i:i + 1] for i in range(len(data))] if split else [data]


def parse_requests(kind: str, data: bytes, split: bool, max_head: int = MAX_HEAD) -> tuple:
    """("accept", messages, tunnel bytes) or ("reject", error class name, complete messages).
    Any other exception escapes: the codec contract is that only ProxyErrors leave feed()."""
    rec = RequestRecorder()
    parser = make_request_parser(kind, rec, max_head)
    pieces = _pieces(data, split)
    tunnel = None
    try:
        for i, piece in enumerate(pieces):
            rest = parser.feed(piece)
            if rest is not None:  # an upgrade: what follows belongs to the tunnel
                tunnel = rest + b"".join(pieces[i + 1:])
                break
    except ClientFault as exc:
        done = [m.key() for m in rec.messages if m.trailers is not None]
        return ("reject", type(exc).__name__, done)
    return ("accept", [m.key() for m in rec.messages], tunnel)


def _agree(outcomes: dict[str, tuple], expect: str | None) -> None:
    llhttp, h11 = outcomes["llhttp"], outcomes["h11"]
    assert llhttp == h11, f"codecs disagree:\n  llhttp: {llhttp!r}\n  h11:    {h11!r}"
    if expect is not None:
        assert llhttp[0] == expect, llhttp


def _run_requests(data: bytes, max_head: int = MAX_HEAD) -> dict[str, tuple]:
    outcomes = {}
    for kind in CODECS:
        whole = parse_requests(kind, data, split=False, max_head=max_head)
        split = parse_requests(kind, data, split=True, max_head=max_head)
        assert whole == split, f"{kind} depends on how the bytes arrive:\n  whole: {whole!r}\n  split: {split!r}"
        outcomes[kind] = whole
    return outcomes


def _req(*lines: bytes, body: bytes = b"") -> bytes:
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


H = b"Host: example.test"
CHUNKED = b"Transfer-Encoding: chunked"

# (id, raw bytes, expected verdict or None, xfail reason or None)
REQUESTS = [
    # -- valid ---------------------------------------------------------------------------------
    ("get", _req(b"GET / HTTP/1.1", H), "accept", None),
    ("get_query_and_escapes", _req(b"GET /a%20b/c?x=1&y=%2F#frag HTTP/1.1", H), "accept", None),
    ("post_content_length", _req(b"POST /submit HTTP/1.1", H, b"Content-Length: 11", body=b"hello world"),
     "accept", None),
    ("post_zero_length", _req(b"POST / HTTP/1.1", H, b"Content-Length: 0"), "accept", None),
    ("post_without_framing", _req(b"POST / HTTP/1.1", H), "accept", None),
    ("get_with_body", _req(b"GET / HTTP/1.1", H, b"Content-Length: 3", body=b"abc"), "accept", None),
    ("chunked_with_extensions_and_trailers",
     _req(b"POST /up HTTP/1.1", H, CHUNKED, body=b"3;name=val;q=\"a b\"\r\nabc\r\nA\r\n0123456789\r\n"
          b"0;last\r\nX-Checksum: 13\r\nX-Other: t\r\n\r\n"), "accept", None),
    ("chunked_hex_and_leading_zeros", _req(b"POST / HTTP/1.1", H, CHUNKED,
                                           body=b"0000a\r\n0123456789\r\n0\r\n\r\n"), "accept", None),
    ("chunked_case_insensitive", _req(b"POST / HTTP/1.1", H, b"Transfer-Encoding: Chunked",
                                      body=b"3\r\nabc\r\n0\r\n\r\n"), "accept", None),
    ("pipelined_pair", _req(b"GET /1 HTTP/1.1", H) + _req(b"POST /2 HTTP/1.1", H, b"Content-Length: 2",
                                                          body=b"ok"), "accept", None),
    ("pipelined_three_mixed", _req(b"GET /1 HTTP/1.1", H)
     + _req(b"POST /2 HTTP/1.1", H, CHUNKED, body=b"1\r\nx\r\n0\r\n\r\n") + _req(b"HEAD /3 HTTP/1.1", H),
     "accept", None),
    ("http10", _req(b"GET / HTTP/1.0"), "accept", None),
    ("http10_keep_alive", _req(b"GET / HTTP/1.0", b"Connection: keep-alive", H), "accept", None),
    ("http11_connection_close", _req(b"GET / HTTP/1.1", H, b"Connection: close"), "accept", None),
    ("absolute_form", _req(b"GET http://example.test:8080/p?q HTTP/1.1", b"Host: example.test:8080"),
     "accept", None),
    ("asterisk_form", _req(b"OPTIONS * HTTP/1.1", H), "accept", None),
    ("long_header", _req(b"GET / HTTP/1.1", H, b"X-Long: " + b"v" * 30000), "accept", None),
    ("many_headers", _req(b"GET / HTTP/1.1", H, *(b"X-H-%03d: %d" % (i, i) for i in range(300))), "accept", None),
    ("header_case_and_order_kept", _req(b"GET / HTTP/1.1", b"hOsT: example.test", b"x-a: 1", b"X-A: 2"),
     "accept", None),
    ("empty_value_and_tab", _req(b"GET / HTTP/1.1", H, b"X-Empty:", b"X-Tab: a\tb", b"X-Ows:\t v"),
     "accept", None),
    ("obs_text_value", _req(b"GET / HTTP/1.1", H, b"X-Latin: caf\xe9"), "accept", None),
    ("leading_empty_line", b"\r\n" + _req(b"GET / HTTP/1.1", H), "accept", None),
    ("expect_continue", _req(b"PUT /f HTTP/1.1", H, b"Expect: 100-continue", b"Content-Length: 1", body=b"x"),
     "accept", None),
    ("known_extension_methods", _req(b"PURGE /c HTTP/1.1", H) + _req(b"QUERY /q HTTP/1.1", H), "accept", None),
    ("websocket_upgrade", _req(b"GET /ws HTTP/1.1", H, b"Connection: Upgrade", b"Upgrade: websocket",
                               b"Sec-WebSocket-Version: 13", body=b"\x81\x00frames"), "accept", None),
    # -- invalid: smuggling and ambiguous framing ------------------------------------------
    ("cl_and_te", _req(b"POST / HTTP/1.1", H, b"Content-Length: 4", CHUNKED, body=b"0\r\n\r\n"), "reject", None),
    ("te_and_cl", _req(b"POST / HTTP/1.1", H, CHUNKED, b"Content-Length: 4", body=b"0\r\n\r\n"), "reject", None),
    ("two_content_lengths", _req(b"POST / HTTP/1.1", H, b"Content-Length: 3", b"Content-Length: 4",
                                 body=b"abcd"), "reject", None),
    ("bad_content_length", _req(b"POST / HTTP/1.1", H, b"Content-Length: 3x", body=b"abc"), "reject", None),
    ("negative_content_length", _req(b"POST / HTTP/1.1", H, b"Content-Length: -1"), "reject", None),
    ("plus_content_length", _req(b"POST / HTTP/1.1", H, b"Content-Length: +3", body=b"abc"), "reject", None),
    ("content_length_overflow", _req(b"POST / HTTP/1.1", H, b"Content-Length: 99999999999999999999999"),
     "reject", None),
    ("empty_content_length", _req(b"POST / HTTP/1.1", H, b"Content-Length: "), "reject", None),
    ("bad_chunk_size", _req(b"POST / HTTP/1.1", H, CHUNKED, body=b"zz\r\nabc\r\n0\r\n\r\n"), "reject", None),
    ("hex_prefix_chunk_size", _req(b"POST / HTTP/1.1", H, CHUNKED, body=b"0x3\r\nabc\r\n0\r\n\r\n"),
     "reject", None),
    ("negative_chunk_size", _req(b"POST / HTTP/1.1", H, CHUNKED, body=b"-3\r\nabc\r\n0\r\n\r\n"), "reject", None),
    ("bad_chunk_terminator", _req(b"POST / HTTP/1.1", H, CHUNKED, body=b"3\r\nabcX\r\n0\r\n\r\n"), "reject", None),
    ("obs_fold", _req(b"GET / HTTP/1.1", H, b"X-A: one", b" two"), "reject", None),
    ("whitespace_before_first_header", _req(b"GET / HTTP/1.1", b" " + H), "reject", None),
    ("bare_lf_head", b"GET / HTTP/1.1\nHost: t\n\n", "reject", None),
    ("bare_lf_one_line", b"GET / HTTP/1.1\r\nHost: t\nX-A: b\r\n\r\n", "reject", None),
    ("bare_cr_in_value", _req(b"GET / HTTP/1.1", H, b"X-A: b\rc"), "reject", None),
    ("space_before_colon", _req(b"GET / HTTP/1.1", b"Host : t"), "reject", None),
    ("tab_before_colon", _req(b"GET / HTTP/1.1", H, b"X-A\t: b"), "reject", None),
    ("nul_in_value", _req(b"GET / HTTP/1.1", H, b"X-A: b\x00c"), "reject", None),
    ("vtab_in_te", _req(b"POST / HTTP/1.1", H, b"Transfer-Encoding: \x0bchunked", body=b"0\r\n\r\n"),
     "reject", None),
    ("header_without_colon", _req(b"GET / HTTP/1.1", H, b"NoColon"), "reject", None),
    ("empty_header_name", _req(b"GET / HTTP/1.1", H, b": v"), "reject", None),
    ("separator_in_header_name", _req(b"GET / HTTP/1.1", H, b"X(A): v"), "reject", None),
    ("te_gzip", _req(b"POST / HTTP/1.1", H, b"Transfer-Encoding: gzip", body=b"abc"), "reject", None),
    ("te_chunked_then_gzip", _req(b"POST / HTTP/1.1", H, b"Transfer-Encoding: chunked, gzip", body=b"abc"),
     "reject", None),
    ("te_xchunked", _req(b"POST / HTTP/1.1", H, b"Transfer-Encoding: xchunked", body=b"0\r\n\r\n"),
     "reject", None),
    ("te_twice", _req(b"POST / HTTP/1.1", H, CHUNKED, CHUNKED, body=b"0\r\n\r\n"), "reject", None),
    ("te_chunked_chunked", _req(b"POST / HTTP/1.1", H, b"Transfer-Encoding: chunked, chunked",
                                body=b"0\r\n\r\n"), "reject", None),
    ("te_identity_with_cl", _req(b"POST / HTTP/1.1", H, b"Transfer-Encoding: identity", b"Content-Length: 3",
                                 body=b"abc"), "reject", None),
    ("te_empty", _req(b"POST / HTTP/1.1", H, b"Transfer-Encoding: "), "reject", None),
    ("invalid_method", _req(b"G(T / HTTP/1.1", H), "reject", None),
    ("space_in_method", _req(b"GE T / HTTP/1.1", H), "reject", None),
    ("space_in_target", _req(b"GET /a b HTTP/1.1", H), "reject", None),
    ("control_char_in_target", _req(b"GET /a\x01b HTTP/1.1", H), "reject", None),
    ("bad_version", _req(b"GET / HTTP/1.x", H), "reject", None),
    ("lowercase_protocol", _req(b"GET / http/1.1", H), "reject", None),
    ("trailing_space_after_version", _req(b"GET / HTTP/1.1 ", H), "reject", None),
    ("method_only", _req(b"GET"), "reject", None),
    ("pipelined_then_smuggled", _req(b"GET /1 HTTP/1.1", H)
     + _req(b"POST /2 HTTP/1.1", H, b"Content-Length: 4", CHUNKED, body=b"0\r\n\r\n"), "reject", None),
    ("trailer_bad_name", _req(b"POST / HTTP/1.1", H, CHUNKED, body=b"0\r\nX A: 5\r\n\r\n"), "reject", None),
    ("trailer_bare_cr", _req(b"POST / HTTP/1.1", H, CHUNKED, body=b"0\r\nX-A: 5\r6\r\n\r\n"), "reject", None),
    ("trailer_nul", _req(b"POST / HTTP/1.1", H, CHUNKED, body=b"0\r\nX-A: 5\x006\r\n\r\n"), "reject", None),
    # -- the codecs disagree (findings) ---------------------------------------------------------
    ("duplicate_identical_cl", _req(b"POST / HTTP/1.1", H, b"Content-Length: 3", b"Content-Length: 3",
                                    body=b"abc"), None,
     "identical duplicate Content-Length: llhttp rejects (400), h11 merges and accepts (RFC 9112 §6.3 allows either)"),
    ("cl_list", _req(b"POST / HTTP/1.1", H, b"Content-Length: 3, 3", body=b"abc"), None,
     "Content-Length: '3, 3': llhttp rejects (400), h11 accepts as 3"),
    ("chunk_size_overflow", _req(b"POST / HTTP/1.1", H, CHUNKED, body=b"ffffffffffffffffff\r\nabc\r\n0\r\n\r\n"),
     "reject", "chunk size of 18 hex digits: llhttp rejects (overflow), h11 accepts it and waits for 2**72 bytes"),
    ("chunk_size_trailing_space", _req(b"POST / HTTP/1.1", H, CHUNKED, body=b"3 \r\nabc\r\n0\r\n\r\n"),
     "reject", "'3 ' as chunk size (whitespace without ';'): llhttp rejects, h11 accepts"),
    ("chunk_ext_nul", _req(b"POST / HTTP/1.1", H, CHUNKED, body=b"3;\x00\r\nabc\r\n0\r\n\r\n"),
     "reject", "NUL in a chunk extension: llhttp rejects, h11 accepts"),
    ("chunk_ext_bare_cr", _req(b"POST / HTTP/1.1", H, CHUNKED, body=b"3;a\rb\r\nabc\r\n0\r\n\r\n"),
     "reject", "bare CR in a chunk extension: llhttp rejects, h11 accepts (RFC 9112 §2.2)"),
    ("chunk_lines_bare_lf", _req(b"POST / HTTP/1.1", H, CHUNKED, body=b"3\nabc\n0\n\n"),
     "reject", "bare LF after chunk sizes: llhttp rejects, h11 neither rejects nor completes (waits)"),
    ("trailer_obs_fold", _req(b"POST / HTTP/1.1", H, CHUNKED, body=b"0\r\nX-A: 5\r\n 6\r\n\r\n"),
     "reject", "obs-fold in trailers: llhttp rejects, h11 adapter unfolds and accepts (check_head_bytes "
               "only runs on the head)"),
    ("trailer_bare_lf", _req(b"POST / HTTP/1.1", H, CHUNKED, body=b"0\r\nX-A: 5\n\r\n"),
     "reject", "bare LF in trailers: llhttp rejects, h11 adapter accepts (check_head_bytes only runs on the head)"),
    ("trailer_transfer_encoding", _req(b"POST / HTTP/1.1", H, CHUNKED, body=b"0\r\nTransfer-Encoding: chunked\r\n\r\n"),
     None, "Transfer-Encoding in trailers: llhttp rejects, h11 accepts (and gatewise drops it as hop-by-hop)"),
    ("trailer_content_length", _req(b"POST / HTTP/1.1", H, CHUNKED, body=b"0\r\nContent-Length: 5\r\n\r\n"),
     None, "Content-Length in trailers: llhttp rejects, h11 accepts and gatewise forwards it in the "
           "upstream trailer section (RFC 9110 §6.5.1: framing fields do not belong there)"),
    ("te_gzip_then_chunked", _req(b"POST / HTTP/1.1", H, b"Transfer-Encoding: gzip, chunked",
                                  body=b"3\r\nabc\r\n0\r\n\r\n"),
     "reject", "Transfer-Encoding 'gzip, chunked': h11 rejects, llhttp accepts, and gatewise then forwards "
               "(gatewise itself then refuses it with 400 in scan_request: see test_safety)"),
    ("del_in_value", _req(b"GET / HTTP/1.1", H, b"X-A: b\x7fc"), "reject",
     "DEL (0x7F) in a field value: llhttp rejects, h11 accepts (not a field-vchar, RFC 9110 §5.5)"),
    ("trailing_ows_in_value", _req(b"GET / HTTP/1.1", H, b"X-Request-Id: abc  "), "accept",
     "trailing whitespace in a field value: h11 strips it, the llhttp adapter keeps it (RFC 9110 §5.5: "
     "OWS is not part of the value), so e.g. a client X-Request-Id is kept by one codec and replaced by the other"),
    ("two_spaces_after_method", _req(b"GET  / HTTP/1.1", H), "reject",
     "two spaces after the method: llhttp accepts, h11 rejects (RFC 9112 §3: exactly one SP)"),
    ("http09_request_line", b"GET /\r\n\r\n", "reject",
     "HTTP/0.9 request line 'GET /': llhttp accepts it as version 0.9, h11 rejects (gatewise then "
     "refuses version 0.9 with 400)"),
    ("http2_version", _req(b"GET / HTTP/2.0", H), "reject",
     "'HTTP/2.0' in an HTTP/1.1 request line: both codecs accept it (gatewise then refuses any "
     "version but 1.0 and 1.1 with 400)"),
    ("http11_without_host", _req(b"GET / HTTP/1.1"), "reject",
     "HTTP/1.1 request without Host: h11 rejects, llhttp accepts (gatewise then refuses it with 400)"),
    ("two_hosts", _req(b"GET / HTTP/1.1", b"Host: a.test", b"Host: b.test"), "reject",
     "two Host fields: h11 rejects, llhttp accepts (gatewise then refuses it with 400, RFC 9112 §3.2)"),
    ("prior_knowledge_h2", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "reject",
     "HTTP/2 connection preface: llhttp rejects it outright; h11 first completes a request "
     "'PRI * HTTP/2.0' (which gatewise starts forwarding) and only then rejects 'SM'"),
    ("lowercase_method", _req(b"get / HTTP/1.1", H), None,
     "method 'get' (a valid token, methods are case-sensitive): llhttp rejects it, h11 accepts"),
    ("unknown_extension_method", _req(b"BREW /pot HTTP/1.1", H), "accept",
     "an unregistered method token: llhttp only knows a fixed method table and answers 400, h11 accepts "
     "(RFC 9110 §9.1: methods are extensible; nginx forwards any token)"),
    ("connect", _req(b"CONNECT example.test:443 HTTP/1.1", b"Host: example.test:443"), None,
     "CONNECT: llhttp flags it as an upgrade (the rest of the stream becomes a tunnel), h11 as a plain request"),
    ("upgrade_with_body", _req(b"POST /up HTTP/1.1", H, b"Connection: upgrade", b"Upgrade: foo",
                               b"Content-Length: 3", body=b"abcXYZ"), None,
     "Upgrade request with a Content-Length body: llhttp hands the body to the tunnel, h11 parses it as body"),
]


def _params(cases):
    return [pytest.param(data, expect, id=name,
                         marks=[pytest.mark.xfail(strict=True, reason=f"codecs disagree: {why}")] if why else [])
            for name, data, expect, why in cases]


@pytest.mark.parametrize("data,expect", _params(REQUESTS))
def test_request_codecs_agree(data, expect):
    _agree(_run_requests(data), expect)


def test_request_corpus_is_sizeable():
    assert len(REQUESTS) >= 40
    assert len({name for name, *_ in REQUESTS}) == len(REQUESTS)


@pytest.mark.parametrize("size,expect", [(4000, "accept"), (5000, "reject")], ids=["under", "over"])
def test_head_limit_agrees(size, expect):
    """max_request_header_bytes = 4096: both codecs accept just under it and answer 431 over it."""
    data = _req(b"GET / HTTP/1.1", b"X-Pad: " + b"p" * (size - 40), H)
    outcomes = _run_requests(data, max_head=4096)
    if expect == "reject":
        assert outcomes["llhttp"][:2] == outcomes["h11"][:2] == ("reject", "RequestHeadersTooLarge"), outcomes
    else:
        _agree(outcomes, "accept")


# Bytes a parser may take of a head or trailer line that never ends, with a 4 KiB limit:
# for llhttp the limit plus its slack for one large read; h11 buffers unparsed bytes
# only up to the limit.
ENDLESS_BOUND = {"llhttp": 4096 + _RAW_SLACK, "h11": 4096}


def _fed_before_refusal(parser, piece, refusal=RequestHeadersTooLarge) -> int:
    """Feed piece(bytes fed so far) until the parser refuses; the bytes it took first.
    A parser still reading after 1 MiB fails the test."""
    fed = 0
    with pytest.raises(refusal):
        while fed < 1024 * 1024:
            data = piece(fed)
            parser.feed(data)
            fed += len(data)
    return fed


@pytest.mark.parametrize("kind", CODECS)
def test_endless_header_is_bounded(kind):
    """A header that never ends must be refused after a bounded number of bytes, not
    buffered until the client stops: 431 within the limit plus one read's slack."""
    parser = make_request_parser(kind, RequestRecorder(), 4096)
    parser.feed(b"GET / HTTP/1.1\r\nHost: t\r\nX-Endless: ")
    fed = _fed_before_refusal(parser, lambda fed: b"e" * 4096)
    assert fed <= ENDLESS_BOUND[kind]


@pytest.mark.parametrize("kind", CODECS)
def test_endless_trailers_are_bounded(kind):
    """Trailer fields that keep coming are held to the head limit as well (llhttp's head
    is measured only when its raw bytes pass the limit, so the trailers need a bound of
    their own)."""
    parser = make_request_parser(kind, RequestRecorder(), 4096)
    parser.feed(b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n")
    piece = lambda fed: b"X-T-%06d: %s\r\n" % (fed, b"t" * 200)  # noqa: E731
    fed = _fed_before_refusal(parser, piece)
    # complete fields, summed as they come: refused within a field of the limit (the
    # raw-bytes slack, which bounds only a line that never ends, must not be what stops them)
    assert fed <= 4096 + len(piece(0))


@pytest.mark.parametrize("before", [1, 2], ids=["second", "third"])
def test_a_pipelined_head_over_the_limit_is_refused(before):
    """Regression: a head that began in the same read as an earlier request was counted
    from zero, so an oversized second head in one read got through (llhttp sums a head
    only once the bytes read since it began pass the limit)."""
    small = _req(b"GET /a HTTP/1.1", H)
    big = _req(b"GET /b HTTP/1.1", H, b"X-Pad: " + b"p" * 6000)
    outcomes = _run_requests(small * before + big, max_head=4096)
    assert outcomes["llhttp"] == outcomes["h11"], outcomes
    verdict, error, done = outcomes["llhttp"]
    assert (verdict, error, len(done)) == ("reject", "RequestHeadersTooLarge", before)


@pytest.mark.parametrize("kind", CODECS)
def test_in_head_is_true_between_a_heads_first_bytes_and_its_end(kind):
    """in_head() is what the client side times by client_header: empty lines before a
    request (RFC 9112 §2.2) and a body are not a head; half of a pipelined one is."""
    recorder = RequestRecorder()
    parser = make_request_parser(kind, recorder, MAX_HEAD)
    seen = []
    for piece in (b"\r\n", b"POST / HTTP/1.1\r\nHo", b"st: t\r\nContent-Length: 4\r\n\r\nab",
                  b"cd" + b"GET / HTTP/1.1\r\nHost: t\r\n\r\n" + b"GET /half HTTP/1.1\r\n", b"Host: t\r\n\r\n"):
        parser.feed(piece)
        seen.append(parser.in_head())
    assert seen == [False, True, False, True, False]
    assert [m.head[1] for m in recorder.messages] == [b"/", b"/", b"/half"]


def _trailers_over_the_limit() -> bytes:
    """30 trailer fields, about 6.6 KB: over a 4 KiB limit when they arrive whole."""
    return b"".join(b"X-T-%02d: %s\r\n" % (i, b"t" * 200) for i in range(30))


@pytest.mark.parametrize("kind", CODECS)
def test_request_trailers_over_the_limit_in_one_read_are_refused(kind):
    """Trailers that arrive whole in one read are summed too, before they are handed on."""
    trailers = _trailers_over_the_limit()
    data = b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n" + trailers + b"\r\n"
    rec = RequestRecorder()
    parser = make_request_parser(kind, rec, 4096)
    with pytest.raises(RequestHeadersTooLarge):
        parser.feed(data)
    assert rec.messages[0].trailers is None  # never handed on


@pytest.mark.parametrize("kind", CODECS)
@pytest.mark.parametrize("stuck", [b"0\r\nX-Endless: ", b"1;ext="], ids=["trailer_value", "chunk_extension"])
def test_a_trailer_or_chunk_line_that_never_ends_is_bounded(kind, stuck):
    """Bytes that make no progress after the head (httptools buffers an unfinished trailer
    value or chunk line itself) are bounded like a head's."""
    parser = make_request_parser(kind, RequestRecorder(), 4096)
    parser.feed(b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n" + stuck)
    fed = _fed_before_refusal(parser, lambda fed: b"e" * 4096, refusal=ClientFault)
    assert fed <= ENDLESS_BOUND[kind]


@pytest.mark.parametrize("kind", CODECS)
def test_response_trailers_over_the_limit_are_refused_and_never_reused(kind):
    trailers = _trailers_over_the_limit()
    rec = ResponseRecorder()
    parser = make_response_parser(kind, rec, 4096)
    parser.start(b"GET")
    with pytest.raises(ProxyError):
        parser.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n" + trailers + b"\r\n")
    assert not parser.reusable
    assert "end" not in [e[0] for e in rec.events]


@pytest.mark.parametrize("kind", CODECS)
@pytest.mark.parametrize("size,expect", [(4000, "accept"), (5000, "reject")], ids=["under", "over"])
def test_head_limit_holds_when_the_head_comes_in_pieces(kind, size, expect):
    """The limit does not depend on how the head is cut into reads: 100-byte pieces."""
    data = _req(b"GET / HTTP/1.1", b"X-Pad: " + b"p" * (size - 40), H)
    rec = RequestRecorder()
    parser = make_request_parser(kind, rec, 4096)
    with pytest.raises(RequestHeadersTooLarge) if expect == "reject" else contextlib.nullcontext():
        for i in range(0, len(data), 100):
            parser.feed(data[i:i + 100])
    assert len(rec.messages) == (0 if expect == "reject" else 1)  # handed on whole, or never


# -- response side ---------------------------------------------------------------------------------
class ResponseRecorder(ResponseHandler):
    def __init__(self) -> None:
        self.events: list = []

    def on_response_head(self, head) -> None:
        self.events.append(("head", head.status, bytes(head.reason), head.version, _norm_headers(head.headers)))

    def on_response_body(self, data: bytes) -> None:
        if self.events and self.events[-1][0] == "body":
            self.events[-1] = ("body", self.events[-1][1] + data)
        else:
            self.events.append(("body", bytes(data)))

    def on_response_end(self, trailers) -> None:
        self.events.append(("end", _norm_headers(trailers)))


def parse_response(kind: str, method: bytes, data: bytes, eof: bool, split: bool, upgrade: bool) -> tuple:
    rec = ResponseRecorder()
    parser = make_response_parser(kind, rec, MAX_HEAD)
    parser.start(method, upgrade)
    pieces = _pieces(data, split)
    tunnel = None
    try:
        for i, piece in enumerate(pieces):
            rest = parser.feed(piece)
            if rest is not None:
                tunnel = rest + b"".join(pieces[i + 1:])
                break
        ended_by_eof = parser.feed_eof() if eof else None
    except ProxyError as exc:
        return ("reject", type(exc).__name__, [e for e in rec.events if e[0] == "head" and e[1] < 200])
    # `reusable` is compared in test_response_never_offered_for_reuse_when_unsafe instead: the
    # codecs may differ where both are safe (llhttp gives up reuse after HEAD or 101).
    return ("accept", rec.events, tunnel, ended_by_eof)


# (id, request method, raw response, feed_eof() after, upgrade request, expected verdict, xfail reason)
RESPONSES = [
    ("content_length", b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc", False, False, "accept", None),
    ("head_with_length", b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", False, False, "accept",
     None),
    ("head_with_chunked", b"HEAD", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", False, False,
     "accept", None),
    ("no_content_204", b"GET", b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n", False, False, "accept", None),
    ("no_content_204_with_length", b"DELETE", b"HTTP/1.1 204 No Content\r\nContent-Length: 3\r\n\r\n",
     False, False, "accept", None),
    ("not_modified_304", b"GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\nETag: \"x\"\r\n\r\n",
     False, False, "accept", None),
    ("interim_then_final", b"POST", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n"
     b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi", False, False, "accept", None),
    ("chunked_with_trailers", b"GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n"
     b"5\r\ndefgh\r\n0\r\nX-Checksum: 8\r\n\r\n", False, False, "accept", None),
    ("close_delimited", b"GET", b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end", True, False,
     "accept", None),
    ("close_delimited_http10", b"GET", b"HTTP/1.0 200 OK\r\n\r\nold", True, False, "accept", None),
    ("connection_close", b"GET", b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx",
     False, False, "accept", None),
    ("no_reason_phrase", b"GET", b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n", False, False, "accept", None),
    ("cut_content_length", b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nabc", True, False, "accept", None),
    ("cut_chunked", b"GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n", True, False,
     "accept", None),
    ("switching_protocols", b"GET", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
     b"Connection: upgrade\r\n\r\n\x81\x00frames", False, True, "accept", None),
    ("two_content_lengths", b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
     False, False, "reject", None),
    ("bad_chunk_size", b"GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", False, False,
     "reject", None),
    ("obs_fold", b"GET", b"HTTP/1.1 200 OK\r\nX-A: b\r\n c\r\nContent-Length: 0\r\n\r\n", False, False,
     "reject", None),
    ("bare_lf", b"GET", b"HTTP/1.1 200 OK\nContent-Length: 0\n\n", False, False, "reject", None),
    ("bare_cr", b"GET", b"HTTP/1.1 200 OK\r\nX-A: b\rc\r\nContent-Length: 0\r\n\r\n", False, False, "reject", None),
    ("two_digit_status", b"GET", b"HTTP/1.1 20 OK\r\nContent-Length: 0\r\n\r\n", False, False, "reject", None),
    ("not_http", b"GET", b"\x00\x01garbage that is not HTTP\r\n\r\n", False, False, "reject", None),
    # -- the codecs disagree (findings) ---------------------------------------------------------
    ("cl_and_te", b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
     False, False, None, "response with Content-Length and Transfer-Encoding: llhttp rejects (502), h11 lets "
     "Transfer-Encoding win and keeps the connection reusable (RFC 9112 §6.3: 'ought to be handled as an error')"),
    ("duplicate_identical_cl", b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
     False, False, None, "identical duplicate Content-Length: llhttp rejects (502), h11 accepts"),
    ("chunk_size_overflow", b"GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\n",
     False, False, "reject", "18-hex-digit chunk size: llhttp rejects, h11 accepts and waits"),
    ("te_gzip_close_delimited", b"GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabc", True, False,
     None, "Transfer-Encoding: gzip (chunked not final, read until close, RFC 9112 §6.3): h11 rejects (502), "
     "llhttp reads until close but feed_eof() calls it incomplete"),
    ("bytes_after_response", b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"
     b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", False, False, "accept",
     "bytes after a complete response: llhttp delivers a second response's head and end; h11 stops after "
     "one when the bytes come together and raises UpstreamProtocolError when they come byte by byte"),
]


@pytest.mark.parametrize("method,data,eof,upgrade,expect", [
    pytest.param(method, data, eof, upgrade, expect, id=name,
                 marks=[pytest.mark.xfail(strict=True, reason=f"codecs disagree: {why}")] if why else [])
    for name, method, data, eof, upgrade, expect, why in RESPONSES])
def test_response_codecs_agree(method, data, eof, upgrade, expect):
    outcomes = {}
    for kind in CODECS:
        whole = parse_response(kind, method, data, eof, split=False, upgrade=upgrade)
        split = parse_response(kind, method, data, eof, split=True, upgrade=upgrade)
        assert whole == split, f"{kind} depends on how the bytes arrive:\n  whole: {whole!r}\n  split: {split!r}"
        outcomes[kind] = whole
    _agree(outcomes, expect)


@pytest.mark.parametrize("kind", CODECS)
@pytest.mark.parametrize("data", [
    b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx",
    b"HTTP/1.1 200 OK\r\n\r\nclose-delimited",
    b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcEXTRA",
], ids=["connection_close", "close_delimited", "http10", "extra_bytes"])
def test_response_never_offered_for_reuse_when_unsafe(kind, data):
    """A connection whose response says close, is close-delimited, is HTTP/1.0 without
    keep-alive, or carried bytes beyond the response must never go back to the pool."""
    rec = ResponseRecorder()
    parser = make_response_parser(kind, rec, MAX_HEAD)
    parser.start(b"GET")
    try:
        parser.feed(data)
        parser.feed_eof()
    except ProxyError:
        pass
    assert not parser.reusable


@pytest.mark.parametrize("kind", CODECS)
def test_response_parser_reusable_across_keepalive(kind):
    """The same parser reads consecutive responses on one pooled connection."""
    rec = ResponseRecorder()
    parser = make_response_parser(kind, rec, MAX_HEAD)
    for i in range(3):
        parser.start(b"GET")
        parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n%d" % i)
        assert parser.reusable
    assert [e for e in rec.events if e[0] == "body"] == [("body", b"0"), ("body", b"1"), ("body", b"2")]


# -- the version read from the chunk (llhttp adapter) -------------------------------------------
# The llhttp adapter reads a message's version from its start line when the message begins
# the chunk being fed, and asks httptools otherwise. Cut in two at every byte, each stream
# must give the versions h11 gives: mixed versions in one chunk, a head cut anywhere, and
# a header value that looks like a start line right where a chunk begins.
VERSION_REQUESTS = [  # (stream, the versions of its requests)
    (_req(b"GET /a HTTP/1.0", H), [b"1.0"]),
    (_req(b"GET /a HTTP/1.1", H) + _req(b"GET /a HTTP/1.0", H), [b"1.1", b"1.0"]),
    (_req(b"GET /a HTTP/1.0", H, b"Connection: keep-alive") + _req(b"GET /a HTTP/1.1", H), [b"1.0", b"1.1"]),
    (_req(b"POST /a HTTP/1.0", H, b"Content-Length: 16", b"Connection: keep-alive",
          body=b" HTTP/1.1\r\nX: y\r\n") + _req(b"GET /a HTTP/1.1", H), [b"1.0", b"1.1"]),
    (_req(b"GET /HTTP/1.1 HTTP/1.0", H, b"X-A: GET /a HTTP/1.1"), [b"1.0"]),
]
VERSION_RESPONSES = [  # (stream, the versions of its heads) after a POST
    (b"HTTP/1.0 200 OK\r\nX-A: HTTP/1.1 x\r\nContent-Length: 0\r\n\r\n", [b"1.0"]),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", [b"1.1", b"1.0"]),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 9\r\n\r\nHTTP/1.1 ", [b"1.0"]),
]


@pytest.mark.parametrize("data,expected", VERSION_REQUESTS, ids=range(len(VERSION_REQUESTS)))
def test_request_version_at_every_cut(data, expected):
    def versions(kind: str, pieces: list[bytes]) -> list[bytes]:
        rec = RequestRecorder()
        parser = make_request_parser(kind, rec, MAX_HEAD)
        for piece in pieces:
            parser.feed(piece)
        return [m.head[2] for m in rec.messages]

    assert versions("h11", [data]) == expected
    for cut in range(len(data) + 1):
        assert versions("llhttp", [data[:cut], data[cut:]]) == expected, cut


@pytest.mark.parametrize("data,expected", VERSION_RESPONSES, ids=range(len(VERSION_RESPONSES)))
def test_response_version_at_every_cut(data, expected):
    def versions(kind: str, pieces: list[bytes]) -> list[bytes]:
        rec = ResponseRecorder()
        parser = make_response_parser(kind, rec, MAX_HEAD)
        parser.start(b"POST")
        for piece in pieces:
            parser.feed(piece)
        return [e[3] for e in rec.events if e[0] == "head"]

    assert versions("h11", [data]) == expected
    for cut in range(len(data) + 1):
        assert versions("llhttp", [data[:cut], data[cut:]]) == expected, cut


@pytest.mark.parametrize("side", ["request", "response"])
def test_a_read_ending_inside_a_head_is_not_kept(side):
    """The version is read from the chunk only while it is being fed: a slow peer's
    partial head must not pin its (up to 256 KiB) read until the head completes."""
    import sys

    if side == "request":
        parser = make_request_parser("llhttp", RequestRecorder(), MAX_HEAD)
        chunk = b"GET / HTTP/1.0\r\nX-A: " + b"a" * 60_000
        rest = b"\r\nHost: t\r\n\r\n"
    else:
        rec = ResponseRecorder()
        parser = make_response_parser("llhttp", rec, MAX_HEAD)
        parser.start(b"GET")
        chunk = b"HTTP/1.0 200 OK\r\nX-A: " + b"a" * 60_000
        rest = b"\r\nContent-Length: 0\r\n\r\n"
    refs = sys.getrefcount(chunk)
    parser.feed(chunk)
    assert sys.getrefcount(chunk) == refs
    parser.feed(rest)  # the head completes in another read: httptools gives the version
    if side == "request":
        assert parser._h.messages[0].head[2] == b"1.0"
    else:
        assert rec.events[0][3] == b"1.0"
