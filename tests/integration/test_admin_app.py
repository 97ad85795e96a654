"""diagnostics.admin over real loopback: the admin app on port 0, fed by a fake AdminSources.

The fake behaves like the proxy's real sources (plain snapshot dicts, read per request),
so these tests pin the HTTP contract of every endpoint without starting a proxy.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from dataclasses import dataclass, field

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from diagnostics.admin import AdminServer, admin_warning, make_app, start_admin
from proxy.stats import Histogram

NOW = 1_700_000_000.0
ROOT = Path(__file__).resolve().parents[2]

# aiohttp serves the admin listener on whichever loop the proxy runs: check both.
pytestmark = pytest.mark.both_loops


def _hist(*values: float) -> dict:
    h = Histogram()
    for v in values:
        h.observe(v)
    return h.snapshot()


UPSTREAMS = {"pools": {"app": {"balance": "weighted_round_robin", "servers": [
    {"url": "http://127.0.0.1:9001", "weight": 3, "backup": False, "state": "healthy",
     "health": {"last_check": NOW, "last_status": 200, "last_error": None,
                "consecutive_successes": 4, "consecutive_failures": 0, "latency_ms": 0.9},
     "active_requests": 1, "idle_connections": 2, "requests_total": 40, "failures_total": 0,
     "failures_by_error": {}, "last_failure": None, "latency_ms": {"p50": 0.7, "p99": 3.0}},
    {"url": "http://127.0.0.1:9002", "weight": 1, "backup": False, "state": "unhealthy",
     "health": {"last_check": NOW, "last_status": None, "last_error": "connection_refused",
                "consecutive_successes": 0, "consecutive_failures": 3, "latency_ms": None},
     "active_requests": 0, "idle_connections": 0, "requests_total": 5, "failures_total": 5,
     "failures_by_error": {"connection_refused": 5},
     "last_failure": {"at": NOW, "error": "connection_refused", "details": "connect ECONNREFUSED"},
     "latency_ms": {"p50": None, "p99": None}}]}}}

FAILED = {"request_id": "f00dcafe", "at": NOW, "method": "GET", "path": "/x", "status": 502,
          "error": "connection_refused", "details": "2 of 2 servers tried",
          "attempts": [{"server": "127.0.0.1:9002", "error": "connection_refused",
                        "details": "connect ECONNREFUSED", "elapsed_ms": 0.3}]}

METRICS = {"buckets": list(Histogram().bounds), "client_connections": 2, "retries_total": 1,
           "keepalive_race_retries_total": 0, "generated_errors": {"connection_refused": 1},
           "pools": {"app": {"request_latency": _hist(0.002, 0.2), "servers": [
               {"address": "127.0.0.1:9001", "state": "healthy",
                "responses_by_class": {"2xx": 40}, "failures_by_error": {},
                "latency": _hist(0.001, 0.003), "checks": {"pass": 4, "fail": 0}}]}}}


@dataclass
class FakeSources:
    token: str = ""
    is_ready: bool = True
    doctor_report: object = None
    fail: bool = False
    calls: list[str] = field(default_factory=list)

    def upstreams(self) -> dict:
        if self.fail:
            raise RuntimeError("snapshot exploded")
        return UPSTREAMS

    def requests(self) -> list[dict]:
        return [FAILED]

    def request(self, request_id: str) -> dict | None:
        self.calls.append(request_id)
        return FAILED if request_id == FAILED["request_id"] else None

    def config(self) -> dict:
        return {"admin": {"address": "127.0.0.1:0", "token": "<redacted>"}}

    def metrics(self) -> dict:
        return METRICS

    def ready(self) -> bool:
        return self.is_ready

    def doctor(self):
        return self.doctor_report

    def out_reasons(self) -> dict[str, str]:
        return {}

    def workers(self) -> list[dict]:
        return [{"index": 0, "pid": 1, "alive": True, "started_at": 0.0, "restarts": 0,
                 "client_connections": 0, "requests_total": 0}]


@pytest.fixture
async def admin():
    """admin(sources) -> (AdminServer, base URL, session); all closed at teardown."""
    started: list[AdminServer] = []
    session = aiohttp.ClientSession()

    async def make(sources: FakeSources | None = None):
        server = await start_admin(sources or FakeSources(), "127.0.0.1", 0)
        started.append(server)
        return server, f"http://{server.address}", session

    yield make
    await session.close()
    for server in started:
        await server.close()


async def get(session, url, method="GET", **kw):
    async with session.request(method, url, **kw) as r:
        return r.status, r.headers, await r.read()


# ---- endpoints -----------------------------------------------------------------------------

async def test_listener_binds_a_real_port_on_loopback(admin):
    server, base, _ = await admin()
    assert server.host == "127.0.0.1" and server.port > 0
    assert server.address == f"127.0.0.1:{server.port}"


@pytest.mark.parametrize("path,body", [
    ("/debug/upstreams", UPSTREAMS),
    ("/debug/requests", [FAILED]),
    ("/debug/requests/f00dcafe", FAILED),
    ("/debug/config", {"admin": {"address": "127.0.0.1:0", "token": "<redacted>"}}),
    ("/healthz", {"status": "ok"}),
    ("/readyz", {"ready": True}),
])
async def test_json_endpoints(admin, path, body):
    _, base, session = await admin()
    status, headers, raw = await get(session, base + path)
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert headers["Cache-Control"] == "no-store"
    assert orjson.loads(raw) == body


async def test_unknown_request_id_is_404_json(admin):
    sources = FakeSources()
    _, base, session = await admin(sources)
    status, headers, raw = await get(session, base + "/debug/requests/nope-123")
    assert status == 404 and headers["Content-Type"] == "application/json"
    body = orjson.loads(raw)
    assert body["error"] == "unknown request id" and body["request_id"] == "nope-123"
    assert sources.calls == ["nope-123"]


async def test_unknown_path_is_404_json_listing_endpoints(admin):
    _, base, session = await admin()
    status, headers, raw = await get(session, base + "/debug/nothing")
    assert status == 404 and headers["Content-Type"] == "application/json"
    assert "/debug/upstreams" in orjson.loads(raw)["endpoints"]


async def test_readyz_is_503_when_not_ready(admin):
    sources = FakeSources(is_ready=False)
    _, base, session = await admin(sources)
    status, _, raw = await get(session, base + "/readyz")
    assert (status, orjson.loads(raw)) == (503, {"ready": False})
    sources.is_ready = True  # read per request, not cached
    status, _, raw = await get(session, base + "/readyz")
    assert (status, orjson.loads(raw)) == (200, {"ready": True})


async def test_doctor_501_until_it_exists_then_its_report(admin):
    sources = FakeSources()
    _, base, session = await admin(sources)
    status, headers, raw = await get(session, base + "/debug/doctor")
    assert status == 501 and headers["Content-Type"] == "application/json"
    assert orjson.loads(raw) == {"error": "doctor arrives in a later release"}

    report = {"ok": True, "servers": [], "config": []}
    sources.doctor_report = report
    status, _, raw = await get(session, base + "/debug/doctor")
    assert (status, orjson.loads(raw)) == (200, report)

    async def live_probe():  # the real doctor will run its probes asynchronously
        return {**report, "ok": False}
    sources.doctor_report = None
    sources.doctor = live_probe
    status, _, raw = await get(session, base + "/debug/doctor")
    assert (status, orjson.loads(raw)["ok"]) == (200, False)


async def test_debug_page_is_html_with_servers_and_failures(admin):
    _, base, session = await admin()
    status, headers, raw = await get(session, base + "/debug")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    page = raw.decode()
    assert "http://127.0.0.1:9001" in page and "http://127.0.0.1:9002" in page
    assert 'href="/debug/requests/f00dcafe"' in page
    assert '<meta http-equiv="refresh" content="2">' in page


async def test_metrics_is_prometheus_text(admin):
    _, base, session = await admin()
    status, headers, raw = await get(session, base + "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    names = {f.name for f in text_string_to_metric_families(raw.decode())}
    assert {"gatewise_requests", "gatewise_upstream_latency_seconds", "gatewise_server_up"} <= names
    assert 'gatewise_requests_total{pool="app",server="127.0.0.1:9001",code="2xx"} 40' in raw.decode()


@pytest.mark.parametrize("path", ["/healthz", "/metrics", "/debug", "/debug/upstreams"])
async def test_head_answers_like_get_without_a_body(admin, path):
    _, base, session = await admin()
    _, get_headers, _ = await get(session, base + path)
    status, headers, raw = await get(session, base + path, method="HEAD")
    assert status == 200 and raw == b""
    assert headers["Content-Type"] == get_headers["Content-Type"]


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
async def test_only_get_and_head(admin, method):
    _, base, session = await admin()
    status, headers, raw = await get(session, base + "/debug/upstreams", method=method, data=b"{}")
    assert status == 405
    assert headers["Allow"] == "GET, HEAD"
    assert orjson.loads(raw)["error"] == "method not allowed"


async def test_a_failing_source_gives_500_json_and_the_listener_keeps_serving(admin):
    sources = FakeSources(fail=True)
    _, base, session = await admin(sources)
    status, headers, raw = await get(session, base + "/debug/upstreams")
    assert status == 500 and headers["Content-Type"] == "application/json"
    assert "snapshot exploded" in orjson.loads(raw)["details"]
    status, _, _ = await get(session, base + "/healthz")
    assert status == 200


async def test_close_stops_listening():
    server = await start_admin(FakeSources(), "127.0.0.1", 0)
    await server.close()
    with pytest.raises(OSError):
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.close()


# ---- token ---------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/debug/upstreams", "/metrics", "/healthz", "/debug", "/nowhere"])
async def test_token_required_everywhere(admin, path):
    _, base, session = await admin(FakeSources(token="s3cret"))
    status, headers, raw = await get(session, base + path)
    assert status == 401
    assert headers["WWW-Authenticate"].startswith("Bearer")
    assert orjson.loads(raw)["error"] == "unauthorized"


@pytest.mark.parametrize("header", ["Bearer wrong", "Bearer s3cre", "Bearer s3cret2", "Basic s3cret",
                                    "s3cret", "Bearer", "Bearer  "])
async def test_wrong_token_is_401(admin, header):
    _, base, session = await admin(FakeSources(token="s3cret"))
    status, headers, _ = await get(session, base + "/debug/upstreams", headers={"Authorization": header})
    assert status == 401
    assert 'error="invalid_token"' in headers["WWW-Authenticate"]


async def test_right_token_is_200_and_auth_comes_before_method(admin):
    sources = FakeSources(token="s3cret")
    _, base, session = await admin(sources)
    for scheme in ("Bearer", "bearer"):
        status, _, raw = await get(session, base + "/debug/upstreams",
                                   headers={"Authorization": f"{scheme} s3cret"})
        assert (status, orjson.loads(raw)) == (200, UPSTREAMS)
    status, _, _ = await get(session, base + "/debug/upstreams", method="POST")
    assert status == 401
    status, _, _ = await get(session, base + "/debug/upstreams", method="POST",
                             headers={"Authorization": "Bearer s3cret"})
    assert status == 405
    sources.token = ""  # read per request: a reload that clears it takes effect at once
    status, _, _ = await get(session, base + "/healthz")
    assert status == 200


# ---- the warning and the package boundary ---------------------------------------------------

@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost",
                                  "LOCALHOST", "::ffff:127.0.0.1"])
def test_no_warning_on_loopback(host):
    assert admin_warning(host, "") is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "[::]", "", "10.1.2.3", "192.168.0.1", "admin.example.com"])
def test_loud_warning_when_exposed_without_token(host):
    warning = admin_warning(host, "")
    assert warning and warning.startswith("WARNING") and "token" in warning
    assert admin_warning(host, "s3cret") is None


def test_make_app_is_an_aiohttp_application():
    from aiohttp import web
    assert isinstance(make_app(FakeSources()), web.Application)


def test_diagnostics_admin_never_imports_proxy():
    code = ("import sys, diagnostics.admin, diagnostics.metrics, diagnostics.debug_page;"
            "bad = [m for m in sys.modules if m == 'proxy' or m.startswith('proxy.')];"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
