"""Issue 3: active and passive health, destination_unavailable, backups, p2c_ewma, and the
one-log-line-per-transition rule, against real fault upstreams on loopback.

Everything is observed from outside: response status, headers (X-Upstream names the
FaultServer that answered), Proxy-Status, /debug/upstreams and /readyz on the admin
listener, and the JSON log lines on stderr. Time is driven by short health intervals and
polled with deadlines; no test sleeps to synchronise.
"""

from __future__ import annotations

import re

import orjson
import pytest

from tests.rawclient import until
from tests.conftest import Client, http

INTERVAL = 0.05
HEALTH = {"path": "/health", "interval": INTERVAL, "timeout": 0.2, "rise": 2, "fall": 2}
NO_PASSIVE = {"max_fails": 0}

llhttp_only = pytest.mark.parametrize("parser", ["llhttp"])


# ---- helpers ----------------------------------------------------------------------------

async def admin_json(gw, path: str):
    reply = await http(gw.admin.port, "GET", path)
    assert reply.status == 200, (path, reply.status, reply.body[:300])
    return orjson.loads(reply.body)


async def server_view(gw, url: str, pool: str = "app") -> dict:
    doc = await admin_json(gw, "/debug/upstreams")
    for s in doc["pools"][pool]["servers"]:
        if s["url"] == url:
            return s
    raise AssertionError(f"{url} not in /debug/upstreams pool {pool}: {doc}")


def in_state(gw, url: str, state: str, **at_least):
    """An async check for until(): the server's /debug entry once it is in `state` (and its
    health counters reach `at_least`), else None."""
    async def check():
        s = await server_view(gw, url)
        if s["state"] != state:
            return None
        if any(s["health"][k] < v for k, v in at_least.items()):
            return None
        return s
    return check


async def answered_by(port: int, n: int) -> list[str]:
    """n sequential GETs on one keep-alive connection; each must be a 200: who answered."""
    client = await Client.open(port)
    try:
        who = []
        for _ in range(n):
            reply = await client.request("GET", "/")
            assert reply.status == 200, (reply.status, reply.headers, reply.body[:300])
            who.append(reply.header("x-upstream"))
        return who
    finally:
        client.close()


def state_lines(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        if '"event":"server_state"' in line:
            out.append(orjson.loads(line))
    return out


# ---- 1. active health checks ---------------------------------------------------------------

async def test_probes_leave_no_transport_errors(upstream, gateway):
    """A passing probe ends quietly. (Regression: every probe's connection died with
    "Fatal error on transport", an AttributeError from the probe standing in for an
    exchange, logged with a traceback every interval.)"""
    import asyncio

    errors: list[dict] = []
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        a = await upstream("ok")
        gw = await gateway([a], pool={"health": HEALTH, "passive": NO_PASSIVE})
        await until(in_state(gw, a.url, "healthy", consecutive_successes=4), "4 passing probes")
    finally:
        loop.set_exception_handler(previous)
    assert errors == []


async def test_refusing_server_goes_unhealthy_after_fall_and_back_after_rise(upstream, gateway):
    a, b = await upstream("ok"), await upstream("ok")
    gw = await gateway([a, b], pool={"health": HEALTH, "passive": NO_PASSIVE})
    await until(in_state(gw, a.url, "healthy"), "a healthy")
    await until(in_state(gw, b.url, "healthy"), "b healthy")
    assert set(await answered_by(gw.port, 4)) == {a.address, b.address}

    await a.close()   # nothing listens on a's port any more
    down = await until(in_state(gw, a.url, "unhealthy"), "a unhealthy after `fall` probes")
    assert down["health"]["last_error"] == "connection_refused"
    assert down["health"]["last_status"] is None
    assert down["health"]["consecutive_failures"] >= 2
    assert down["health"]["consecutive_successes"] == 0

    # Traffic stops: every request goes to b, and a sees no attempt (no failed ones either).
    before = await server_view(gw, a.url)
    assert await answered_by(gw.port, 10) == [b.address] * 10
    after = await server_view(gw, a.url)
    assert after["state"] == "unhealthy"
    assert after["requests_total"] == before["requests_total"]
    assert after["failures_total"] == before["failures_total"] == 0

    # Restart on the same port: healthy again after `rise` passing probes, traffic resumes.
    await upstream("ok", port=a.port)
    up = await until(in_state(gw, a.url, "healthy"), "a healthy again after `rise` probes")
    assert up["health"]["consecutive_successes"] >= 2
    assert up["health"]["last_status"] == 200 and up["health"]["last_error"] is None
    assert set(await answered_by(gw.port, 4)) == {a.address, b.address}


@llhttp_only
async def test_unhealthy_stays_until_rise_consecutive_passes(upstream, gateway):
    """rise=3 with a slower interval: after the restart, the state is still unhealthy while
    fewer than 3 consecutive probes passed."""
    a = await upstream("ok")
    b = await upstream("ok")
    gw = await gateway([a, b], pool={"health": HEALTH | {"rise": 3, "interval": 0.15},
                                         "passive": NO_PASSIVE})
    await a.close()
    await until(in_state(gw, a.url, "unhealthy"), "a unhealthy")
    await upstream("ok", port=a.port)
    seen_partial = await until(in_state(gw, a.url, "unhealthy", consecutive_successes=1),
                               "one passing probe recorded", timeout=3.0)
    assert seen_partial["health"]["consecutive_successes"] in (1, 2)
    await until(in_state(gw, a.url, "healthy", consecutive_successes=3), "healthy after 3 passes")


# A failed probe has the same RFC 9209 cause as a failed request would.
PROBE_CAUSES = [
    ("refuse", "connection_refused", None),
    ("blackhole", "connection_timeout", None),
    ("hang", "http_response_timeout", None),
    ("status:500", None, 500),
]


@llhttp_only
@pytest.mark.parametrize("mode,error,status", PROBE_CAUSES, ids=[m for m, _, _ in PROBE_CAUSES])
async def test_failed_probe_names_its_cause(upstream, gateway, mode, error, status):
    bad, good = await upstream(mode), await upstream("ok")
    gw = await gateway([bad, good], pool={"health": HEALTH, "passive": NO_PASSIVE})
    s = await until(in_state(gw, bad.url, "unhealthy"), f"{mode} server unhealthy")
    assert s["health"]["last_status"] == status
    if error is not None:
        assert s["health"]["last_error"] == error
    else:
        assert s["health"]["last_error"]   # some reason is given for an unexpected status
    assert s["health"]["consecutive_failures"] >= 2
    assert await answered_by(gw.port, 6) == [good.address] * 6


async def test_health_500_is_unhealthy_with_last_status(upstream, gateway):
    bad, good = await upstream("status:500"), await upstream("ok")
    gw = await gateway([bad, good], pool={"health": HEALTH, "passive": NO_PASSIVE})
    s = await until(in_state(gw, bad.url, "unhealthy"), "status:500 server unhealthy")
    assert s["health"]["last_status"] == 500
    assert await answered_by(gw.port, 4) == [good.address] * 4


@llhttp_only
async def test_expect_status_range_is_honoured(upstream, gateway):
    """expect_status = "500": a server answering 500 passes, one answering 200 fails."""
    five, ok = await upstream("status:500"), await upstream("ok")
    gw = await gateway([five, ok], pool={"health": HEALTH | {"expect_status": "500"},
                                         "passive": NO_PASSIVE})
    await until(in_state(gw, five.url, "healthy"), "status:500 server healthy")
    s = await until(in_state(gw, ok.url, "unhealthy"), "200 server unhealthy")
    assert s["health"]["last_status"] == 200


# ---- 2. passive health -------------------------------------------------------------------

@llhttp_only
async def test_blackholed_server_costs_the_connect_timeout_once(upstream, gateway):
    hole, ok = await upstream("blackhole"), await upstream("ok")
    gw = await gateway([hole, ok], pool={"passive": {"max_fails": 1, "eject_for": 30}},
                       timeouts={"connect": 0.2})
    client = await Client.open(gw.port)
    slow = []
    try:
        for i in range(50):
            reply = await client.request("GET", "/")
            assert reply.status == 200, (i, reply.status, reply.headers)
            assert reply.header("x-upstream") == ok.address
            if reply.elapsed >= 0.2:
                slow.append((i, reply.elapsed))
    finally:
        client.close()
    assert len(slow) <= 1, slow
    s = await server_view(gw, hole.url)
    assert s["state"] == "ejected"
    assert s["failures_by_error"] == {"connection_timeout": 1}
    assert s["failures_total"] == 1
    assert s["last_failure"]["error"] == "connection_timeout"


@llhttp_only
async def test_ejected_server_returns_after_a_trial_request(upstream, gateway):
    down, ok = await upstream("refuse"), await upstream("ok")
    gw = await gateway([down, ok], pool={"passive": {"max_fails": 1, "eject_for": 0.3}})
    # The first request tries `down` (first in config order), is refused, retried on ok.
    reply = await http(gw.port)
    assert reply.status == 200 and reply.header("x-upstream") == ok.address
    s = await server_view(gw, down.url)
    assert s["state"] == "ejected"
    assert s["failures_by_error"] == {"connection_refused": 1}

    await down.close()                     # the refusing stand-in frees the port...
    await upstream("ok", port=down.port)   # ...and the service comes back on it

    async def reaches_it():
        r = await http(gw.port)
        assert r.status == 200, (r.status, r.headers)
        return r.header("x-upstream") == down.address
    await until(reaches_it, "a trial request reaches the restarted server", timeout=3.0)
    s = await server_view(gw, down.url)
    assert s["state"] == "healthy"
    assert set(await answered_by(gw.port, 4)) == {down.address, ok.address}


@llhttp_only
async def test_failed_trial_ejects_again(upstream, gateway):
    """Without active checks, a trial that fails puts the server out for another period;
    no request fails for the client meanwhile (each is retried on the healthy server)."""
    down, ok = await upstream("refuse"), await upstream("ok")
    gw = await gateway([down, ok], pool={"passive": {"max_fails": 1, "eject_for": 0.1}})
    assert (await http(gw.port)).status == 200

    async def second_failure():
        r = await http(gw.port)
        assert r.status == 200 and r.header("x-upstream") == ok.address
        s = await server_view(gw, down.url)
        return s if s["failures_total"] >= 2 else None
    s = await until(second_failure, "a trial request is sent to the ejected server")
    assert s["state"] == "ejected"
    assert s["failures_by_error"] == {"connection_refused": s["failures_total"]}


@llhttp_only
async def test_4xx_and_upstream_5xx_do_not_eject(upstream, gateway):
    """Only upstream-caused failures count: a 500 the upstream chose to send is forwarded,
    and never ejects the server."""
    five = await upstream("status:500")
    gw = await gateway([five], pool={"passive": {"max_fails": 1, "eject_for": 30}})
    for _ in range(3):
        reply = await http(gw.port)
        assert reply.status == 500
        assert reply.our_status().get("received-status") == 500
    s = await server_view(gw, five.url)
    assert s["state"] != "ejected"
    assert s["failures_total"] == 0


# ---- 3. no server available --------------------------------------------------------------

def reason_re(address: str, why: str) -> re.Pattern:
    return re.compile(re.escape(address) + r" " + why)


@llhttp_only
async def test_all_ejected_gives_503_with_reasons(upstream, gateway):
    a, b = await upstream("refuse"), await upstream("refuse")
    gw = await gateway([a, b], pool={"passive": {"max_fails": 1}})
    first = await http(gw.port)   # a refused, b refused: both ejected; the cause is the last one
    assert first.status == 502
    assert first.our_status()["error"] == "connection_refused"
    for s in (a, b):
        assert (await server_view(gw, s.url))["state"] == "ejected"

    reply = await http(gw.port)
    assert reply.status == 503
    ps = reply.our_status()
    assert ps["error"] == "destination_unavailable"
    details = ps["details"]
    for s in (a, b):
        assert reason_re(s.address, r"ejected: 1 failures in 10 s, last connection_refused, "
                                    r"back in \d+ s").search(details), details
    body = orjson.loads(reply.body)
    assert body["status"] == 503 and body["error"] == "destination_unavailable"
    assert body["request_id"] == reply.header("x-request-id")

    ready = await http(gw.admin.port, "GET", "/readyz")
    assert ready.status == 503
    assert (await http(gw.admin.port, "GET", "/healthz")).status == 200


@llhttp_only
async def test_all_unhealthy_gives_503_with_reasons(upstream, gateway):
    a, b = await upstream("refuse"), await upstream("refuse")
    gw = await gateway([a, b], pool={"health": HEALTH, "passive": NO_PASSIVE})
    for s in (a, b):
        await until(in_state(gw, s.url, "unhealthy"), f"{s.address} unhealthy")
    reply = await http(gw.port)
    assert reply.status == 503
    ps = reply.our_status()
    assert ps["error"] == "destination_unavailable"
    for s in (a, b):
        assert reason_re(s.address, r"unhealthy: \d+ health checks failed, last connection_refused"
                         ).search(ps["details"]), ps["details"]
    assert (await http(gw.admin.port, "GET", "/readyz")).status == 503
    assert (await http(gw.admin.port, "GET", "/healthz")).status == 200


@llhttp_only
async def test_readyz_follows_recovery(upstream, gateway):
    a = await upstream("ok")
    gw = await gateway([a], pool={"health": HEALTH, "passive": NO_PASSIVE})
    await until(in_state(gw, a.url, "healthy"), "healthy")
    assert (await http(gw.admin.port, "GET", "/readyz")).status == 200
    await a.close()
    await until(in_state(gw, a.url, "unhealthy"), "unhealthy")
    assert (await http(gw.admin.port, "GET", "/readyz")).status == 503
    await upstream("ok", port=a.port)
    await until(in_state(gw, a.url, "healthy"), "healthy again")
    assert (await http(gw.admin.port, "GET", "/readyz")).status == 200


@llhttp_only
async def test_backup_is_unused_while_a_primary_is_available(upstream, gateway):
    primary, spare = await upstream("ok"), await upstream("ok")
    gw = await gateway([primary, {"url": spare.url, "backup": True}])
    assert await answered_by(gw.port, 6) == [primary.address] * 6


@llhttp_only
async def test_backup_answers_while_primaries_are_ejected(upstream, gateway):
    p1, p2, spare = await upstream("refuse"), await upstream("refuse"), await upstream("ok")
    gw = await gateway([p1, p2, {"url": spare.url, "backup": True}],
                       pool={"passive": {"max_fails": 1}})
    assert await answered_by(gw.port, 6) == [spare.address] * 6
    for s in (p1, p2):
        assert (await server_view(gw, s.url))["state"] == "ejected"
    assert (await http(gw.admin.port, "GET", "/readyz")).status == 200


@llhttp_only
async def test_backup_answers_while_primaries_are_unhealthy_then_503(upstream, gateway):
    p, spare = await upstream("refuse"), await upstream("ok")
    gw = await gateway([p, {"url": spare.url, "backup": True}],
                       pool={"health": HEALTH, "passive": NO_PASSIVE})
    await until(in_state(gw, p.url, "unhealthy"), "primary unhealthy")
    await until(in_state(gw, spare.url, "healthy"), "backup healthy")
    assert await answered_by(gw.port, 4) == [spare.address] * 4
    assert (await http(gw.admin.port, "GET", "/readyz")).status == 200

    await spare.close()   # now the backup is out too
    await until(in_state(gw, spare.url, "unhealthy"), "backup unhealthy")
    reply = await http(gw.port)
    assert reply.status == 503
    details = reply.our_status()["details"]
    assert p.address in details and spare.address in details, details
    assert (await http(gw.admin.port, "GET", "/readyz")).status == 503


# ---- 9. p2c_ewma -------------------------------------------------------------------------

@llhttp_only
async def test_p2c_ewma_prefers_the_fast_server(upstream, gateway):
    slow, fast = await upstream("slow:0.05"), await upstream("ok")
    gw = await gateway([slow, fast], pool={"balance": "p2c_ewma", "passive": NO_PASSIVE})
    who = await answered_by(gw.port, 200)
    assert who.count(fast.address) > 150, (who.count(fast.address), who.count(slow.address))
    assert who.count(fast.address) + who.count(slow.address) == 200


# ---- 10. one log line per transition -------------------------------------------------------

@llhttp_only
async def test_one_log_line_per_transition_nothing_in_steady_state(upstream, gateway, capfd):
    ok, down = await upstream("ok"), await upstream("refuse")
    gw = await gateway([ok, down], pool={"health": HEALTH, "passive": NO_PASSIVE})
    await until(in_state(gw, ok.url, "healthy", consecutive_successes=5), "ok healthy, 5 passes")
    await until(in_state(gw, down.url, "unhealthy", consecutive_failures=6), "down unhealthy, 6 fails")
    lines = state_lines(capfd.readouterr().err)
    by_server = {ln["server"]: ln for ln in lines}
    assert len(lines) == 2 and set(by_server) == {ok.address, down.address}, lines
    assert (by_server[ok.address]["old"], by_server[ok.address]["new"]) == ("unknown", "healthy")
    went_down = by_server[down.address]
    assert (went_down["old"], went_down["new"]) == ("unknown", "unhealthy")
    assert went_down["error"] == "connection_refused"
    assert went_down["pool"] == "app"

    # Steady state: many more probes, no more lines.
    s = await server_view(gw, down.url)
    target = s["health"]["consecutive_failures"] + 5
    await until(in_state(gw, down.url, "unhealthy", consecutive_failures=target), "5 more failed probes")
    assert state_lines(capfd.readouterr().err) == []

    # Recovery: exactly one more line.
    await down.close()
    await upstream("ok", port=down.port)
    await until(in_state(gw, down.url, "healthy", consecutive_successes=5), "down healthy, 5 passes")
    lines = state_lines(capfd.readouterr().err)
    assert len(lines) == 1, lines
    assert (lines[0]["server"], lines[0]["old"], lines[0]["new"]) == (down.address, "unhealthy", "healthy")


@llhttp_only
async def test_passive_ejection_logs_one_line(upstream, gateway, capfd):
    down, ok = await upstream("refuse"), await upstream("ok")
    gw = await gateway([down, ok], pool={"passive": {"max_fails": 1, "eject_for": 30}})
    assert await answered_by(gw.port, 10) == [ok.address] * 10
    lines = state_lines(capfd.readouterr().err)
    assert len(lines) == 1, lines
    line = lines[0]
    assert (line["server"], line["old"], line["new"]) == (down.address, "unknown", "ejected")
    assert line["error"] == "connection_refused"
