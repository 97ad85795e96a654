"""Pure header rewriting (proxy/headers.py): no sockets."""

from __future__ import annotations

import os
import re

import pytest

from proxy import headers as H
from proxy.codec.base import RequestHead, ResponseHead


def req(headers, method=b"GET", target=b"/", version=b"1.1", upgrade=False) -> RequestHead:
    return RequestHead(method, target, version, headers, True, upgrade)


def lines(head: bytes) -> list[bytes]:
    assert head.endswith(b"\r\n\r\n")
    return head[:-4].split(b"\r\n")


def build(headers, **kw):
    head = req(headers, **{k: v for k, v in kw.items() if k in ("method", "target", "version", "upgrade")})
    info = H.scan_request(head, b"gatewise")
    out = H.build_request_head(head, target=head.target, client_ip=b"10.0.0.7", proto=b"http",
                               via=b"1.1 gatewise")
    return info, lines(out)


def test_hop_by_hop_and_connection_named_fields_are_removed():
    info, out = build([(b"Host", b"a"), (b"Connection", b"keep-alive, X-Secret"), (b"X-Secret", b"1"),
                       (b"Keep-Alive", b"timeout=5"), (b"Proxy-Connection", b"keep-alive"),
                       (b"TE", b"gzip"), (b"Trailer", b"X-T"), (b"Upgrade", b"h2c"), (b"X-Keep", b"yes")])
    names = [line.split(b":")[0].lower() for line in out[1:]]
    for gone in (b"connection", b"x-secret", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade"):
        assert gone not in names
    assert b"X-Keep: yes" in out
    assert b"Host: a" in out  # Host is kept as the client sent it


def test_forwarding_fields_are_appended_or_set():
    info, out = build([(b"Host", b"shop.example"), (b"X-Forwarded-For", b"1.2.3.4"),
                       (b"X-Forwarded-Proto", b"https"), (b"X-Forwarded-Host", b"evil"), (b"Via", b"1.0 edge")])
    assert b"X-Forwarded-For: 1.2.3.4, 10.0.0.7" in out
    assert b"X-Forwarded-Proto: http" in out and b"X-Forwarded-Proto: https" not in out
    assert b"X-Forwarded-Host: shop.example" in out and b"X-Forwarded-Host: evil" not in out
    assert b"Via: 1.0 edge, 1.1 gatewise" in out
    assert out[0] == b"GET / HTTP/1.1"


@pytest.mark.parametrize("incoming,kept", [(b"abc-123_x.y:z", True), (b"has space", False),
                                           (b"x" * 129, False), (b"", False)])
def test_request_id_kept_only_when_sane(incoming, kept):
    info, out = build([(b"Host", b"a"), (b"X-Request-Id", incoming)])
    assert (info.request_id == incoming.decode()) is kept
    assert out.count(b"X-Request-Id: " + info.request_id.encode()) == 1


def test_framing_is_decided_once():
    info, out = build([(b"Host", b"a"), (b"Content-Length", b"5")], method=b"POST")
    assert info.framing == H.LENGTH and b"Content-Length: 5" in out
    info, out = build([(b"Host", b"a"), (b"Transfer-Encoding", b"chunked")], method=b"POST")
    assert info.framing == H.CHUNKED and b"Transfer-Encoding: chunked" in out
    info, out = build([(b"Host", b"a"), (b"Content-Length", b"0")], method=b"POST")
    assert info.framing == H.NO_BODY and not any(b"Content-Length" in x for x in out)


@pytest.mark.parametrize("headers,version,method,problem", [
    ([(b"Host", b"a"), (b"Host", b"b")], b"1.1", b"GET", "more than one Host"),
    ([], b"1.1", b"GET", "without a Host"),
    ([], b"1.0", b"GET", None),
    ([(b"Host", b"a"), (b"Transfer-Encoding", b"gzip, chunked")], b"1.1", b"POST", "transfer coding"),
    ([(b"Host", b"a")], b"1.1", b"CONNECT", "CONNECT"),
])
def test_request_problems(headers, version, method, problem):
    info = H.scan_request(req(headers, method=method, version=version), b"gatewise")
    if problem is None:
        assert info.problem is None
    else:
        assert problem in info.problem


@pytest.mark.parametrize("via,looped", [(b"1.1 gatewise", True), (b"1.0 edge, 1.1 GateWise", True),
                                        (b"1.1 gatewise-2", False), (b"gatewise", False)])
def test_loop_detection_reads_received_by(via, looped):
    assert H.scan_request(req([(b"Host", b"a"), (b"Via", via)]), b"gatewise").looped is looped


def test_idempotent_methods():
    for m in (b"GET", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"TRACE"):
        assert H.scan_request(req([(b"Host", b"a")], method=m), b"g").idempotent
    for m in (b"POST", b"PATCH"):
        assert not H.scan_request(req([(b"Host", b"a")], method=m), b"g").idempotent


def plan(status=200, headers=(), method=b"GET", client_version=b"1.1", keep_alive=True, version=b"1.1",
         proxy_status=None):
    return H.plan_response(ResponseHead(status, b"", version, list(headers)), request_method=method,
                           client_version=client_version, client_keep_alive=keep_alive,
                           request_id=b"rid", via=b"1.1 gatewise", proxy_status=proxy_status)


def test_response_content_length_passes_through():
    p = plan(headers=[(b"Content-Length", b"6"), (b"Keep-Alive", b"timeout=5, max=100")])
    assert p.framing == H.LENGTH and p.keep_alive and p.upstream_keep_alive
    assert p.keepalive_timeout == 5.0
    out = lines(p.rewritten)
    assert out[0] == b"HTTP/1.1 200 OK"
    assert b"Content-Length: 6" in out and b"X-Request-Id: rid" in out and b"Via: 1.1 gatewise" in out
    assert not any(x.lower().startswith(b"keep-alive") for x in out)


def test_close_delimited_response_is_rechunked_for_http11_and_closes_for_http10():
    p = plan(headers=[])
    assert p.framing == H.CHUNKED and not p.upstream_keep_alive
    assert b"Transfer-Encoding: chunked" in lines(p.rewritten)
    p = plan(headers=[(b"Transfer-Encoding", b"chunked")], client_version=b"1.0")
    assert p.framing == H.UNTIL_CLOSE and not p.keep_alive
    assert b"Connection: close" in lines(p.rewritten)
    assert not any(b"Transfer-Encoding" in x for x in lines(p.rewritten))


@pytest.mark.parametrize("status,method", [(204, b"GET"), (304, b"GET"), (200, b"HEAD")])
def test_no_body_responses(status, method):
    p = plan(status=status, method=method, headers=[(b"Content-Length", b"42")])
    assert p.framing == H.NO_BODY


def test_upstream_connection_close_is_honoured():
    assert not plan(headers=[(b"Content-Length", b"1"), (b"Connection", b"close")]).upstream_keep_alive
    assert not plan(headers=[(b"Content-Length", b"1")], version=b"1.0").upstream_keep_alive


def test_forwarded_5xx_carries_our_member_and_keeps_theirs():
    p = plan(status=502, headers=[(b"Content-Length", b"0"), (b"Proxy-Status", b"inner; error=connection_refused")],
             proxy_status=b'gatewise; next-hop="a:1"; received-status=502')
    out = lines(p.rewritten)
    assert out.index(b"Proxy-Status: inner; error=connection_refused") < \
        out.index(b'Proxy-Status: gatewise; next-hop="a:1"; received-status=502')


def test_trailer_block():
    assert H.trailer_block([]) == b"0\r\n\r\n"
    assert H.trailer_block([(b"X-Sum", b"1"), (b"Transfer-Encoding", b"x")]) == b"0\r\nX-Sum: 1\r\n\r\n"


def test_connection_named_headers_are_dropped_whatever_their_length():
    """The length fast path must not skip a header that Connection names."""
    info, out = build([(b"Host", b"a"), (b"Connection", b"close, X-Very-Long-Private-Header"),
                       (b"X-Very-Long-Private-Header", b"secret"), (b"X-Other", b"kept")])
    assert not any(b"Private" in line for line in out)
    assert b"X-Other: kept" in out
    p = plan(headers=[(b"Content-Length", b"1"), (b"Connection", b"X-Internal-Debug-Field"),
                      (b"X-Internal-Debug-Field", b"1"), (b"Server", b"s")])
    assert b"X-Internal-Debug-Field" not in p.rewritten and b"Server: s" in p.rewritten


def test_date_is_added_to_a_forwarded_response_without_one():
    """RFC 9110 §6.6.1: a proxy with a clock adds Date when the upstream sent none."""
    from email.utils import parsedate_to_datetime

    out = lines(plan(headers=[(b"Content-Length", b"1")]).rewritten)
    (date,) = [x for x in out if x.startswith(b"Date: ")]
    assert parsedate_to_datetime(date[6:].decode()).tzinfo is not None
    kept = lines(plan(headers=[(b"Content-Length", b"1"), (b"Date", b"Tue, 01 Jan 2030 00:00:00 GMT")]).rewritten)
    assert [x for x in kept if x.startswith(b"Date: ")] == [b"Date: Tue, 01 Jan 2030 00:00:00 GMT"]
    assert not any(x.startswith(b"Date: ") for x in lines(plan(status=100).rewritten))


# -- one pass per direction: the field tables must agree with HOP_BY_HOP, and a field named
#    in Connection is dropped wherever it stands (the scan then runs a second time)

def test_every_hop_by_hop_field_is_classified_in_both_directions():
    for name in H.HOP_BY_HOP:
        assert H._REQUEST_FIELDS.get(name, H._KEEP) != H._KEEP, name
        assert H._RESPONSE_FIELDS.get(name, H._R_KEEP) != H._R_KEEP, name


def test_connection_named_fields_are_dropped_before_and_after_it():
    info, out = build([(b"Host", b"a"), (b"X-Early", b"1"), (b"Via", b"1.0 edge"), (b"X-Forwarded-For", b"1.2.3.4"),
                       (b"Connection", b"x-early, via, X-Forwarded-For, x-late"), (b"X-Late", b"2"),
                       (b"X-Keep", b"yes")])
    names = [line.split(b":")[0].lower() for line in out[1:]]
    assert b"x-early" not in names and b"x-late" not in names
    assert b"X-Keep: yes" in out and b"Host: a" in out
    assert b"Via: 1.1 gatewise" in out              # the named Via is not passed on
    assert b"X-Forwarded-For: 10.0.0.7" in out      # nor the named X-Forwarded-For
    assert info.host == b"a"


def test_response_connection_named_fields_are_dropped_before_and_after_it():
    p = plan(headers=[(b"X-Early", b"1"), (b"Content-Length", b"1"), (b"Connection", b"X-Early, close"),
                      (b"X-Late", b"2"), (b"X-Keep", b"yes")])
    out = lines(p.rewritten)
    names = [line.split(b":")[0].lower() for line in out[1:]]
    assert b"x-early" not in names and b"connection" not in names
    assert b"X-Late: 2" in out and b"X-Keep: yes" in out and b"Content-Length: 1" in out
    assert not p.upstream_keep_alive and p.framing == H.LENGTH
    p = plan(headers=[(b"X-Late", b"2"), (b"Content-Length", b"1"), (b"Connection", b"keep-alive, x-late")],
             version=b"1.0")
    assert p.upstream_keep_alive and b"X-Late: 2" not in lines(p.rewritten)


def test_status_line_keeps_a_nonstandard_reason():
    assert H.status_line(200, b"OK") == H.status_line(200) == b"HTTP/1.1 200 OK\r\n"
    assert H.status_line(200, b"Fine") == b"HTTP/1.1 200 Fine\r\n"
    assert H.status_line(299) == b"HTTP/1.1 299 Unknown\r\n"


def test_several_connection_fields_add_up_and_the_shared_token_sets_stay_as_they_are():
    p = plan(headers=[(b"Connection", b"keep-alive"), (b"X-Hop", b"1"), (b"Connection", b"X-Hop"),
                      (b"Content-Length", b"0")])
    assert b"X-Hop: 1" not in lines(p.rewritten) and p.upstream_keep_alive
    p = plan(headers=[(b"Connection", b"keep-alive"), (b"Connection", b"close"), (b"Content-Length", b"0")])
    assert not p.upstream_keep_alive
    assert H._ONE_TOKEN == {b"keep-alive": frozenset({b"keep-alive"}), b"close": frozenset({b"close"})}
    assert plan(headers=[(b"Connection", b"keep-alive"), (b"Content-Length", b"0")]).upstream_keep_alive
    assert not plan(headers=[(b"Connection", b"close"), (b"Content-Length", b"0")]).upstream_keep_alive


@pytest.mark.parametrize("learn_max", [0, 2, 512])
def test_field_kinds_do_not_depend_on_spelling_or_on_what_was_learned(monkeypatch, learn_max):
    """Kinds are learned by exact spelling, up to _LEARN_MAX spellings; past that, a new
    spelling is still classified, just not remembered."""
    monkeypatch.setattr(H, "_LEARN_MAX", learn_max)
    monkeypatch.setattr(H, "_request_kinds", {})
    monkeypatch.setattr(H, "_response_kinds", {})
    for _ in range(2):  # learning, then learned (or not, past the limit)
        for length in (b"Content-Length", b"content-length", b"CONTENT-LENGTH"):
            p = plan(headers=[(b"X-A", b"1"), (length, b"3"), (b"Keep-Alive", b"timeout=5")])
            assert p.framing == H.LENGTH and p.keepalive_timeout == 5.0
            assert lines(p.rewritten)[1:3] == [b"X-A: 1", b"Via: 1.1 gatewise"]
            info, out = build([(b"HOST", b"a"), (length, b"3"), (b"x-forwarded-for", b"1.2.3.4")])
            assert info.host == b"a" and info.framing == H.LENGTH and info.content_length == 3
            assert b"X-Forwarded-For: 1.2.3.4, 10.0.0.7" in out
    assert len(H._request_kinds) <= learn_max and len(H._response_kinds) <= learn_max
    long_name = b"X-" + b"n" * H._LEARN_NAME_MAX
    assert b"%s: 1" % long_name in lines(plan(headers=[(long_name, b"1")]).rewritten)
    assert long_name not in H._response_kinds  # long names are classified, never kept


def test_generated_request_ids_are_24_hex_digits_as_bytes_and_text():
    n = 2 * H._IDS_PER_BLOCK + 7  # across two refills of the block they are cut from
    ids = {H.new_request_id_bytes() for _ in range(n)}
    assert len(ids) == n and all(re.fullmatch(rb"[0-9a-f]{24}", i) for i in ids)
    assert re.fullmatch(r"[0-9a-f]{24}", H.new_request_id())
    info, out = build([(b"Host", b"a")])
    assert out[-1] == b"X-Request-Id: " + info.request_id_bytes
    assert info.request_id == info.request_id_bytes.decode()


def test_a_forked_child_makes_other_request_ids_than_its_parent():
    """The ids are cut from a block; a child must not hand out what its parent will."""
    H.new_request_id_bytes()  # the parent holds a block with ids left in it
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next id, exit at once
        try:
            os.write(write_end, H.new_request_id_bytes())
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        child_id = os.read(read_end, 64)
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    parent_ids = {H.new_request_id_bytes() for _ in range(H._IDS_PER_BLOCK)}
    assert re.fullmatch(rb"[0-9a-f]{24}", child_id)
    assert child_id not in parent_ids
