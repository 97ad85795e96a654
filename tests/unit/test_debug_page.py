"""diagnostics.debug_page: the /debug HTML page, rendered from plain snapshots."""

from __future__ import annotations

import html
import re
from html.parser import HTMLParser

from diagnostics.debug_page import MAX_REQUESTS, render_debug_page

NOW = 1_700_000_000.0


def server(url: str, state: str, **extra) -> dict:
    base = {"url": url, "weight": 1, "backup": False, "state": state,
            "health": {"last_check": NOW - 3, "last_status": 200, "last_error": None,
                       "consecutive_successes": 5, "consecutive_failures": 0, "latency_ms": 1.2},
            "active_requests": 0, "idle_connections": 2, "requests_total": 100,
            "failures_total": 0, "failures_by_error": {}, "last_failure": None,
            "latency_ms": {"p50": 0.8, "p99": 4.5}}
    base.update(extra)
    return base


def upstreams() -> dict:
    return {"pools": {
        "app": {"balance": "weighted_round_robin", "servers": [
            server("http://127.0.0.1:9001", "healthy", weight=3, active_requests=7),
            server("http://127.0.0.1:9002", "unhealthy",
                   health={"last_check": NOW - 1, "last_status": None,
                           "last_error": "connection_refused", "consecutive_successes": 0,
                           "consecutive_failures": 4, "latency_ms": None},
                   failures_total=4, failures_by_error={"connection_refused": 4},
                   last_failure={"at": NOW - 12, "error": "connection_refused",
                                 "details": "connect ECONNREFUSED after 0.3 ms"},
                   reason="3 health checks failed, last connection_refused"),
            server("http://127.0.0.1:9003", "ejected", backup=True,
                   last_failure={"at": NOW - 5, "error": "http_response_timeout",
                                 "details": "<script>alert(1)</script>"}),
            server("http://127.0.0.1:9004", "unknown", health=None,
                   latency_ms={"p50": None, "p99": None}, future_field={"x": 1}),
        ]},
        "api": {"balance": "p2c_ewma", "servers": [server("http://10.0.0.5:8000", "healthy")]},
    }}


def failed(request_id: str, at: float, **extra) -> dict:
    entry = {"request_id": request_id, "at": at, "method": "GET", "path": "/orders?id=1",
             "status": 502, "error": "connection_refused",
             "details": "connect ECONNREFUSED after 0.3 ms; 2 of 2 servers tried",
             "attempts": [{"server": "127.0.0.1:9002", "error": "connection_refused",
                           "details": "connect ECONNREFUSED", "elapsed_ms": 0.3},
                          {"server": "127.0.0.1:9001", "error": "connection_terminated",
                           "details": "closed before response head", "elapsed_ms": 12.5}]}
    entry.update(extra)
    return entry


def render(ups=None, reqs=None) -> str:
    return render_debug_page(upstreams() if ups is None else ups,
                             [failed("req-newest", NOW - 2), failed("req-older", NOW - 60)]
                             if reqs is None else reqs, NOW)


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def tags(page: str) -> list[tuple[str, dict]]:
    p = _Collect()
    p.feed(page)
    return p.tags


def test_every_pool_and_server_with_its_state_colour_class():
    page = render()
    for pool in ("app", "api"):
        assert f"pool {pool}" in page
    for url, state in [("http://127.0.0.1:9001", "healthy"), ("http://127.0.0.1:9002", "unhealthy"),
                       ("http://127.0.0.1:9003", "ejected"), ("http://127.0.0.1:9004", "unknown"),
                       ("http://10.0.0.5:8000", "healthy")]:
        row = re.search(rf'<tr class="state-(\w+)">((?:(?!</tr>).)*{re.escape(url)}.*?)</tr>', page)
        assert row, url
        assert row.group(1) == state
        assert f'<span class="pill {state}">{state}</span>' in row.group(2)


def test_state_colours_are_the_documented_ones():
    page = render()
    for var, colour in [("healthy", "#1a7f37"), ("unhealthy", "#cf222e"), ("unknown", "#6e7781")]:
        assert f"--{var}:{colour}" in page
    assert re.search(r"--ejected:#[0-9a-f]{6}", page)  # orange
    assert ".pill.ejected{background:var(--ejected)}" in page


def test_server_details_weight_backup_active_latency_check_and_failure():
    page = render()
    app_row = re.search(r'<tr class="state-healthy">.*?9001.*?</tr>', page).group(0)
    assert "weight 3" in app_row
    assert '<td class="num">7</td>' in app_row  # active requests
    assert "0.8 ms / 4.5 ms" in app_row
    assert "3 s ago" in app_row and "status 200" in app_row
    bad = re.search(r'<tr class="state-unhealthy">.*?</tr>', page).group(0)
    assert "connection_refused" in bad and "12 s ago" in bad
    assert "connect ECONNREFUSED after 0.3 ms" in bad
    assert "3 health checks failed, last connection_refused" in bad  # the optional reason
    assert "connection_refused ×4" in bad
    backup = re.search(r'<tr class="state-ejected">.*?</tr>', page).group(0)
    assert ">backup<" in backup


def test_recent_failures_newest_first_with_links_and_attempt_chain():
    page = render()
    assert page.index("req-newest") < page.index("req-older")
    hrefs = [a.get("href") for t, a in tags(page) if t == "a"]
    assert "/debug/requests/req-newest" in hrefs and "/debug/requests/req-older" in hrefs
    section = page[page.index("Recent failed requests"):]
    assert "GET /orders?id=1" in section and "502" in section
    chain = re.search(r'<ol class="chain">(.*?)</ol>', section).group(1)
    first, second = chain.index("127.0.0.1:9002"), chain.index("127.0.0.1:9001")
    assert first < second
    assert "connection_refused" in chain and "connection_terminated" in chain
    assert "0.3 ms" in chain and "12 ms" in chain


def test_only_fifty_requests_are_shown():
    reqs = [failed(f"req-{i:03d}", NOW - i) for i in range(MAX_REQUESTS + 20)]
    page = render(reqs=reqs)
    assert MAX_REQUESTS == 50
    assert "/debug/requests/req-049" in page and "/debug/requests/req-050" not in page
    assert "20 more" in page


def test_everything_interpolated_is_escaped():
    evil = "<script>alert(1)</script>"
    ups = upstreams()
    ups["pools"][evil] = {"balance": evil, "servers": [server(f"http://x/{evil}", evil, reason=evil)]}
    reqs = [failed('id"><script>x</script>', NOW, path=f"/{evil}", details=evil, method=evil,
                   attempts=[{"server": evil, "error": evil, "details": evil, "elapsed_ms": 1}])]
    page = render(ups=ups, reqs=reqs)
    assert "<script" not in page.lower()
    assert html.escape(evil) in page
    # the id is percent-encoded inside the link, and escaped in its text
    hrefs = [a["href"] for t, a in tags(page) if t == "a" and a.get("href", "").startswith("/debug/requests/")]
    assert hrefs == ["/debug/requests/id%22%3E%3Cscript%3Ex%3C%2Fscript%3E"]


def test_refreshes_itself_and_is_self_contained():
    page = render()
    metas = [a for t, a in tags(page) if t == "meta"]
    assert {"http-equiv": "refresh", "content": "2"} in metas
    assert page.lstrip().lower().startswith("<!doctype html>")
    for tag, attrs in tags(page):
        assert tag not in ("script", "link", "img", "iframe")
        for name in ("src", "href"):
            value = attrs.get(name) or ""
            assert not value.startswith(("http:", "https:", "//")), value


def test_empty_inputs_and_missing_fields_render():
    page = render_debug_page({"pools": {}}, [], NOW)
    assert "No pools configured" in page and "No failed requests" in page
    page = render_debug_page({"pools": {"p": {"servers": [{"url": "http://a"}]}}},
                             [{"request_id": "r1"}], NOW)
    assert "http://a" in page and "/debug/requests/r1" in page
    assert render_debug_page({}, [], NOW)


def test_pool_with_nothing_available_is_called_out():
    ups = {"pools": {"down": {"balance": "random", "servers": [
        server("http://127.0.0.1:1", "unhealthy"), server("http://127.0.0.1:2", "ejected")]}}}
    page = render_debug_page(ups, [], NOW)
    assert "No server available" in page and "pool down" in page
    assert "No server available" not in render()
