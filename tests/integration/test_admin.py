"""Issue 3: the admin listener of a real running proxy: /debug/upstreams (SPEC's shape,
exactly), /debug/requests, /debug/config, /metrics (parsed by the Prometheus reference
parser), /healthz, /readyz, the bearer token, the HTML page, and that none of it is
reachable through the main listener.

Admin-only behaviour does not depend on the client codec, so these run on llhttp only.
"""

from __future__ import annotations

import re
import time

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.rawclient import until
from tests.conftest import Client, http

pytestmark = pytest.mark.parametrize("parser", ["llhttp"])

HEALTH = {"path": "/health", "interval": 0.05, "timeout": 0.2, "rise": 2, "fall": 2}
NO_PASSIVE = {"max_fails": 0}
TOKEN = "s3cret"
STATES = {"healthy", "unhealthy", "ejected", "unknown"}


# ---- helpers ----------------------------------------------------------------------------

async def get(gw, path: str, token: str | None = None, *, auth: str | None = None):
    """GET on the admin listener with aiohttp: (status, headers, body bytes)."""
    headers = {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if auth is not None:
        headers["Authorization"] = auth
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{gw.admin.port}{path}", headers=headers) as r:
            return r.status, r.headers, await r.read()


async def admin_json(gw, path: str, token: str | None = None):
    status, headers, body = await get(gw, path, token)
    assert status == 200, (path, status, body[:300])
    assert headers["Content-Type"].startswith("application/json")
    return orjson.loads(body)


async def server_view(gw, url: str, pool: str = "app") -> dict:
    doc = await admin_json(gw, "/debug/upstreams")
    for s in doc["pools"][pool]["servers"]:
        if s["url"] == url:
            return s
    raise AssertionError(f"{url} not in pool {pool}: {doc}")


def in_state(gw, url: str, state: str):
    async def check():
        s = await server_view(gw, url)
        return s if s["state"] == state else None
    return check


async def metrics(gw) -> dict[tuple[str, frozenset], float]:
    """Every sample of /metrics, parsed by the reference parser: {(name, labels): value}."""
    status, headers, body = await get(gw, "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in out, f"duplicate series {key}"
            out[key] = sample.value
    return out


def total(samples: dict, name: str, **labels) -> float:
    """Sum of every series of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def is_num(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ---- 4. /debug/upstreams: SPEC's shape, exactly ------------------------------------------

SERVER_KEYS = {"url", "weight", "backup", "state", "health", "active_requests", "idle_connections",
               "requests_total", "failures_total", "failures_by_error", "last_failure", "latency_ms",
               "endpoints"}  # SPEC's shape plus the resolved addresses (issue 4)
HEALTH_KEYS = {"last_check", "last_status", "last_error", "consecutive_successes",
               "consecutive_failures", "latency_ms"}


def check_server_schema(s: dict) -> None:
    assert set(s) == SERVER_KEYS, set(s) ^ SERVER_KEYS
    assert isinstance(s["url"], str) and s["url"].startswith("http://")
    assert is_int(s["weight"]) and s["weight"] >= 1
    assert isinstance(s["backup"], bool)
    assert s["state"] in STATES
    h = s["health"]
    assert isinstance(h, dict) and set(h) == HEALTH_KEYS, set(h) ^ HEALTH_KEYS
    assert h["last_check"] is None or is_num(h["last_check"])
    assert h["last_status"] is None or is_int(h["last_status"])
    assert h["last_error"] is None or isinstance(h["last_error"], str)
    assert is_int(h["consecutive_successes"]) and h["consecutive_successes"] >= 0
    assert is_int(h["consecutive_failures"]) and h["consecutive_failures"] >= 0
    assert h["latency_ms"] is None or is_num(h["latency_ms"])
    for key in ("active_requests", "idle_connections", "requests_total", "failures_total"):
        assert is_int(s[key]) and s[key] >= 0, (key, s[key])
    assert isinstance(s["failures_by_error"], dict)
    for k, v in s["failures_by_error"].items():
        assert isinstance(k, str) and re.fullmatch(r"[a-z_]+", k) and is_int(v) and v >= 1
    assert sum(s["failures_by_error"].values()) == s["failures_total"]
    lf = s["last_failure"]
    if lf is not None:
        assert isinstance(lf, dict) and set(lf) == {"at", "error", "details"}, lf
        assert is_num(lf["at"]) and isinstance(lf["error"], str) and isinstance(lf["details"], str)
    assert isinstance(s["endpoints"], list) and all(isinstance(e, str) for e in s["endpoints"])
    lat = s["latency_ms"]
    assert isinstance(lat, dict) and set(lat) == {"p50", "p99"}, lat
    for k in ("p50", "p99"):
        assert lat[k] is None or is_num(lat[k])


async def test_upstreams_schema(upstream, gateway):
    """Two pools, every kind of server: healthy, unhealthy, ejected, unknown, backup."""
    ok, down, flaky_down, spare = (await upstream("ok"), await upstream("refuse"),
                                   await upstream("refuse"), await upstream("ok"))
    raw = {"pools": {
        "app": {"servers": [{"url": ok.url, "weight": 3}, {"url": down.url}],
                "health": HEALTH, "passive": NO_PASSIVE},
        "other": {"balance": "least_conn", "passive": {"max_fails": 1},
                  "servers": [{"url": flaky_down.url}, {"url": spare.url, "backup": True}]}},
        "routes": [{"path_prefix": "/other", "pool": "other"}, {"path_prefix": "/", "pool": "app"}]}
    gw = await gateway(None, raw=raw)
    await until(in_state(gw, down.url, "unhealthy"), "down unhealthy")
    await until(in_state(gw, ok.url, "healthy"), "ok healthy")
    reply = await http(gw.port, "GET", "/other/x")   # flaky_down refused + ejected, spare answers
    assert reply.status == 200 and reply.header("x-upstream") == spare.address

    status, headers, body = await get(gw, "/debug/upstreams")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert headers.get("Cache-Control") == "no-store"
    doc = orjson.loads(body)
    assert set(doc) == {"pools"}
    assert set(doc["pools"]) == {"app", "other"}
    for pool in doc["pools"].values():
        assert set(pool) == {"balance", "servers"}
    assert doc["pools"]["app"]["balance"] == "weighted_round_robin"
    assert doc["pools"]["other"]["balance"] == "least_conn"
    seen = {}
    for pool in doc["pools"].values():
        for s in pool["servers"]:
            check_server_schema(s)
            seen[s["url"]] = s
    # config order, config values
    assert [s["url"] for s in doc["pools"]["app"]["servers"]] == [ok.url, down.url]
    assert seen[ok.url]["weight"] == 3 and seen[ok.url]["backup"] is False
    assert seen[spare.url]["backup"] is True
    assert {seen[u]["state"] for u in seen} == {"healthy", "unhealthy", "ejected", "unknown"}
    assert seen[flaky_down.url]["state"] == "ejected"
    assert seen[spare.url]["state"] == "unknown"   # no active check, no failure: no verdict
    assert seen[ok.url]["health"]["last_status"] == 200
    assert seen[down.url]["health"]["last_error"] == "connection_refused"
    assert seen[flaky_down.url]["last_failure"]["error"] == "connection_refused"
    assert seen[spare.url]["health"]["last_check"] is None   # no active checks in "other"


async def test_upstreams_counters_move(upstream, gateway):
    ok, down = await upstream("ok"), await upstream("refuse")
    gw = await gateway([down, ok], pool={"passive": NO_PASSIVE, "retries": 1})
    before = {u: await server_view(gw, u) for u in (ok.url, down.url)}
    for u in before:
        assert before[u]["requests_total"] == 0 and before[u]["failures_total"] == 0
        assert before[u]["latency_ms"] == {"p50": None, "p99": None}
        assert before[u]["last_failure"] is None

    n = 6
    client = await Client.open(gw.port)
    try:
        for _ in range(n):
            assert (await client.request("GET", "/")).status == 200
    finally:
        client.close()
    good, bad = await server_view(gw, ok.url), await server_view(gw, down.url)
    # WRR alternates: down (refused, retried on ok), ok, down, ...: ok answers all n.
    assert good["requests_total"] == n
    assert good["failures_total"] == 0 and good["failures_by_error"] == {}
    assert good["active_requests"] == 0
    assert good["idle_connections"] >= 1   # the upstream connection is pooled
    assert is_num(good["latency_ms"]["p50"]) and is_num(good["latency_ms"]["p99"])
    assert good["latency_ms"]["p50"] <= good["latency_ms"]["p99"]
    assert bad["requests_total"] == bad["failures_total"] >= 1
    assert bad["failures_by_error"] == {"connection_refused": bad["failures_total"]}
    assert bad["last_failure"]["error"] == "connection_refused"
    assert "ECONNREFUSED" in bad["last_failure"]["details"]
    assert bad["idle_connections"] == 0


async def test_latency_percentiles_reflect_a_slow_server(upstream, gateway):
    slow = await upstream("slow:0.05")
    gw = await gateway([slow])
    for _ in range(3):
        assert (await http(gw.port)).status == 200
    s = await server_view(gw, slow.url)
    assert 45 <= s["latency_ms"]["p50"] <= 1000
    assert s["latency_ms"]["p99"] >= s["latency_ms"]["p50"]


async def test_upstream_timestamps_are_wall_clock(upstream, gateway):
    """last_check and last_failure.at are unix seconds, like /debug/requests' `at`, so the
    page can say "just now" (they were once loop.time(): "20000 d ago")."""
    ok, down = await upstream("ok"), await upstream("refuse")
    gw = await gateway([down, ok], pool={"health": HEALTH, "passive": {"max_fails": 1}})
    assert (await http(gw.port)).status == 200   # down refused (recorded), ok answers
    await until(in_state(gw, ok.url, "healthy"), "ok healthy")
    s_ok, s_down = await server_view(gw, ok.url), await server_view(gw, down.url)
    now = time.time()
    page = (await get(gw, "/debug"))[2].decode()
    assert abs(s_ok["health"]["last_check"] - now) < 60, s_ok["health"]["last_check"]
    assert abs(s_down["last_failure"]["at"] - now) < 60, s_down["last_failure"]["at"]
    assert " d ago" not in page


async def test_timings_have_sub_millisecond_resolution(upstream, gateway):
    """Regression: latencies were measured with loop.time(), which ticks in whole ms under
    uvloop, so every elapsed_ms, p50/p99 and health latency_ms was a whole number."""
    ok, down = await upstream("ok"), await upstream("refuse")
    raw = {"pools": {"bad": {"servers": [{"url": down.url}], "retries": 0, "passive": NO_PASSIVE},
                     "good": {"servers": [{"url": ok.url}], "health": HEALTH}},
           "routes": [{"path_prefix": "/good", "pool": "good"}, {"path_prefix": "/", "pool": "bad"}]}
    gw = await gateway(None, raw=raw)
    for _ in range(8):
        assert (await http(gw.port, "GET", "/bad")).status == 502
        assert (await http(gw.port, "GET", "/good")).status == 200
    timings = [a["elapsed_ms"] for e in await admin_json(gw, "/debug/requests") for a in e["attempts"]]
    good = await server_view(gw, ok.url, pool="good")
    timings += [good["latency_ms"]["p50"], good["latency_ms"]["p99"]]
    assert len(timings) == 10
    # Eight refused connects and the percentiles of eight loopback requests: with a clock of
    # microsecond resolution, not all of them land on a whole millisecond.
    assert any(t != int(t) for t in timings), timings


# ---- 5. /debug/requests, /debug/config -----------------------------------------------------

async def test_failed_request_id_leads_to_its_evidence(upstream, gateway):
    down = await upstream("refuse")
    gw = await gateway([down], pool={"retries": 0})
    reply = await http(gw.port, "GET", "/some/path?q=1")
    assert reply.status == 502
    rid = reply.header("x-request-id")
    assert rid and orjson.loads(reply.body)["debug"] == f"/debug/requests/{rid}"
    entry = await admin_json(gw, f"/debug/requests/{rid}")
    assert entry["request_id"] == rid
    assert entry["status"] == 502 and entry["error"] == "connection_refused"
    assert entry["method"] == "GET" and entry["path"] == "/some/path?q=1"
    assert entry["details"]
    assert len(entry["attempts"]) == 1
    attempt = entry["attempts"][0]
    assert attempt["server"] == down.address and attempt["error"] == "connection_refused"
    assert is_num(attempt["elapsed_ms"])

    status, _, body = await get(gw, "/debug/requests/no-such-id")
    assert status == 404
    assert orjson.loads(body)["request_id"] == "no-such-id"


async def test_debug_requests_lists_failures_newest_first(upstream, gateway):
    down, ok = await upstream("refuse"), await upstream("ok")
    raw = {"pools": {"bad": {"servers": [{"url": down.url}], "retries": 0},
                     "good": {"servers": [{"url": ok.url}]}},
           "routes": [{"path_prefix": "/good", "pool": "good"}, {"path_prefix": "/", "pool": "bad"}]}
    gw = await gateway(None, raw=raw)
    ids = []
    for i in range(3):
        r = await http(gw.port, "GET", f"/fail/{i}", headers=[("X-Request-Id", f"req-{i}")])
        assert r.status == 502 and r.header("x-request-id") == f"req-{i}"
        ids.append(f"req-{i}")
        assert (await http(gw.port, "GET", "/good")).status == 200   # successes are not kept
    listed = await admin_json(gw, "/debug/requests")
    assert [e["request_id"] for e in listed] == ids[::-1]
    assert [e["path"] for e in listed] == ["/fail/2", "/fail/1", "/fail/0"]
    for e in listed:
        assert {"request_id", "method", "path", "status", "error", "details", "attempts"} <= set(e)
        assert e["error"] == "connection_refused" and e["status"] == 502


async def test_debug_config_redacts_the_token(upstream, gateway):
    ok = await upstream("ok")
    gw = await gateway([ok], admin={"token": TOKEN}, pool={"health": HEALTH})
    status, headers, body = await get(gw, "/debug/config", TOKEN)
    assert status == 200
    assert TOKEN.encode() not in body
    doc = orjson.loads(body)
    assert doc["admin"]["token"] not in ("", TOKEN)
    assert doc["pools"]["app"]["servers"][0]["url"] == ok.url
    assert doc["pools"]["app"]["health"]["interval"] == 0.05
    # nor anywhere else the admin listener shows
    for path in ("/debug", "/debug/upstreams", "/debug/requests", "/metrics"):
        status, _, body = await get(gw, path, TOKEN)
        assert status == 200 and TOKEN.encode() not in body, path


# ---- 6. /metrics ---------------------------------------------------------------------------

async def test_metrics_parse_and_counters_move(upstream, gateway):
    down, ok = await upstream("refuse"), await upstream("ok")
    gw = await gateway([down, ok], pool={"passive": NO_PASSIVE, "retries": 1})
    m0 = await metrics(gw)
    # the families exist from the first scrape
    for name in ("gatewise_requests_total", "gatewise_server_up", "gatewise_server_state",
                 "gatewise_upstream_latency_seconds_count", "gatewise_request_duration_seconds_count",
                 "gatewise_health_checks_total"):
        assert any(n == name for n, _ in m0), name
    assert total(m0, "gatewise_requests_total", code="2xx") == 0

    n = 5
    for _ in range(n):
        assert (await http(gw.port)).status == 200
    m1 = await metrics(gw)
    assert total(m1, "gatewise_requests_total", code="2xx") == n
    assert total(m1, "gatewise_requests_total", code="2xx", server=ok.address, pool="app") == n
    assert total(m1, "gatewise_requests_total", code="5xx") == 0
    refused = total(m1, "gatewise_upstream_failures_total", error="connection_refused",
                    server=down.address, pool="app")
    assert refused >= 1
    assert total(m1, "gatewise_upstream_failures_total", server=ok.address) == 0
    assert total(m1, "gatewise_upstream_latency_seconds_count", server=ok.address) == n
    assert total(m1, "gatewise_request_duration_seconds_count", pool="app") == n
    assert total(m1, "gatewise_request_duration_seconds_bucket", pool="app", le="+Inf") == n
    assert total(m1, "gatewise_retries_total") == refused
    # a retried request is not a generated response
    assert total(m1, "gatewise_generated_responses_total") == 0


async def test_metrics_count_generated_502(upstream, gateway):
    down = await upstream("refuse")
    gw = await gateway([down], pool={"retries": 0, "passive": NO_PASSIVE})
    m0 = await metrics(gw)
    assert total(m0, "gatewise_generated_responses_total", error="connection_refused") == 0
    for _ in range(2):
        assert (await http(gw.port)).status == 502
    m1 = await metrics(gw)
    assert total(m1, "gatewise_generated_responses_total", error="connection_refused") == 2
    assert total(m1, "gatewise_upstream_failures_total", error="connection_refused",
                 server=down.address) == 2
    assert total(m1, "gatewise_requests_total") == 0   # no upstream response at all


async def test_metrics_health_gauges_and_checks(upstream, gateway):
    ok, down = await upstream("ok"), await upstream("refuse")
    gw = await gateway([ok, down], pool={"health": HEALTH, "passive": NO_PASSIVE})
    await until(in_state(gw, down.url, "unhealthy"), "down unhealthy")
    await until(in_state(gw, ok.url, "healthy"), "ok healthy")
    m = await metrics(gw)
    assert total(m, "gatewise_server_up", server=ok.address) == 1
    assert total(m, "gatewise_server_up", server=down.address) == 0
    assert total(m, "gatewise_server_state", server=down.address, state="unhealthy") == 1
    assert total(m, "gatewise_server_state", server=down.address) == 1   # one state at a time
    assert total(m, "gatewise_server_state", server=ok.address, state="healthy") == 1
    assert total(m, "gatewise_health_checks_total", server=ok.address, result="pass") >= 1
    assert total(m, "gatewise_health_checks_total", server=down.address, result="fail") >= 2
    assert total(m, "gatewise_health_checks_total", server=down.address, result="pass") == 0


# ---- 7. token; admin not on the main listener ---------------------------------------------

ENDPOINTS = ["/debug", "/debug/upstreams", "/debug/requests", "/debug/requests/abc", "/debug/config",
             "/debug/doctor", "/metrics", "/healthz", "/readyz", "/no/such/endpoint"]


async def test_admin_token_is_enforced_on_every_endpoint(upstream, gateway):
    ok = await upstream("ok")
    gw = await gateway([ok], admin={"token": TOKEN})
    for path in ENDPOINTS:
        for auth in (None, "Bearer wrong", f"Basic {TOKEN}", "Bearer", f"Bearer {TOKEN}x"):
            status, headers, body = await get(gw, path, auth=auth)
            assert status == 401, (path, auth, status)
            assert headers.get("WWW-Authenticate", "").startswith("Bearer"), (path, auth)
            assert TOKEN.encode() not in body
    for path in ("/debug", "/debug/upstreams", "/debug/requests", "/debug/config", "/metrics",
                 "/healthz", "/readyz"):
        status, _, _ = await get(gw, path, TOKEN)
        assert status == 200, path
    status, _, _ = await get(gw, "/debug/requests/abc", TOKEN)
    assert status == 404   # authenticated: now the unknown id is reported
    status, _, _ = await get(gw, "/debug/doctor", TOKEN)
    assert status != 401


async def test_no_token_means_open_admin(upstream, gateway):
    ok = await upstream("ok")
    gw = await gateway([ok])
    for path in ("/debug", "/debug/upstreams", "/debug/requests", "/debug/config", "/metrics",
                 "/healthz", "/readyz"):
        status, _, _ = await get(gw, path)
        assert status == 200, path


async def test_admin_is_not_reachable_on_the_main_listener(upstream, gateway):
    ok = await upstream("ok")
    gw = await gateway([ok], admin={"token": TOKEN})
    assert gw.admin.port != gw.port
    for path in ("/debug/upstreams", "/debug", "/debug/config", "/metrics", "/healthz", "/readyz"):
        reply = await http(gw.port, "GET", path, headers=[("Authorization", f"Bearer {TOKEN}")])
        assert reply.status == 200, path
        assert reply.body == b"hello\n", (path, reply.body[:200])
        assert reply.header("x-upstream") == ok.address
    assert ok.last_request["path"] == "/readyz"   # it really went upstream


# ---- 8. the HTML page ----------------------------------------------------------------------

def row_for(page: str, url: str) -> str:
    rows = [r for r in page.split("<tr") if url in r]
    assert len(rows) == 1, f"{url}: {len(rows)} rows"
    return rows[0]


async def test_debug_page_shows_servers_states_and_failures(upstream, gateway):
    down, ok, spare = await upstream("refuse"), await upstream("ok"), await upstream("ok")
    gw = await gateway([down, ok, {"url": spare.url, "backup": True}],
                       pool={"retries": 0, "passive": {"max_fails": 1}})
    failed = await http(gw.port, "GET", "/broken")
    assert failed.status == 502
    rid = failed.header("x-request-id")
    assert (await http(gw.port)).status == 200

    status, headers, body = await get(gw, "/debug")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    page = body.decode()
    assert page.lstrip().lower().startswith("<!doctype html>")
    assert 'http-equiv="refresh"' in page   # it refreshes itself
    expected = {down.url: "ejected", ok.url: "unknown", spare.url: "unknown"}
    for url, state in expected.items():
        row = row_for(page, url)
        assert state in row, (url, state, row[:500])
    assert "backup" in row_for(page, spare.url)
    assert "connection_refused" in row_for(page, down.url)
    assert rid in page
    assert f"/debug/requests/{rid}" in page
    assert "/broken" in page


async def test_debug_page_shows_health_states(upstream, gateway):
    ok, down = await upstream("ok"), await upstream("refuse")
    gw = await gateway([ok, down], pool={"health": HEALTH, "passive": NO_PASSIVE})
    await until(in_state(gw, down.url, "unhealthy"), "down unhealthy")
    await until(in_state(gw, ok.url, "healthy"), "ok healthy")
    page = (await get(gw, "/debug"))[2].decode()
    assert "unhealthy" in row_for(page, down.url)
    assert "connection_refused" in row_for(page, down.url)
    assert "healthy" in row_for(page, ok.url) and "unhealthy" not in row_for(page, ok.url)


async def test_debug_page_says_why_a_server_is_out(upstream, gateway):
    """Regression: the page read a `reason` field the proxy never supplied, so an ejected
    server's row never said why it was out."""
    down, ok = await upstream("refuse"), await upstream("ok")
    gw = await gateway([down, ok], pool={"passive": {"max_fails": 1, "eject_for": 30}})
    assert (await http(gw.port)).status == 200   # down refused and ejected, ok answers
    assert (await server_view(gw, down.url))["state"] == "ejected"
    row = row_for((await get(gw, "/debug"))[2].decode(), down.url)
    assert re.search(r"back in \d+ s", row), row
