"""The per-server health state machine (proxy/servers.py): pure, fake time."""

from __future__ import annotations

from proxy.servers import HealthPolicy, ServerState, State


def server(**policy) -> ServerState:
    return ServerState("http://127.0.0.1:9001", "127.0.0.1", 9001, policy=HealthPolicy(**policy))


def probe(s: ServerState, ok: bool, now: float, error: str | None = None):
    return s.on_probe(ok, now, status=200 if ok else None, error=error, latency_ms=1.0)


def test_starts_unknown_and_available():
    s = server(active=True)
    assert s.state is State.UNKNOWN and s.available(0)


def test_active_fall_and_rise_with_one_event_per_transition():
    s = server(active=True, rise=2, fall=3)
    assert probe(s, True, 0) == (State.UNKNOWN, State.HEALTHY)
    assert probe(s, True, 1) is None  # steady state: nothing to log
    assert probe(s, False, 2, "connection_refused") is None
    assert probe(s, False, 3, "connection_refused") is None
    assert probe(s, False, 4, "connection_refused") == (State.HEALTHY, State.UNHEALTHY)
    assert not s.available(4)
    assert "unhealthy: 3 health checks failed, last connection_refused" in s.out_reason(4)
    assert probe(s, False, 5, "connection_refused") is None
    assert probe(s, True, 6) is None  # one pass is not enough (rise = 2)
    assert not s.available(6)
    assert probe(s, True, 7) == (State.UNHEALTHY, State.HEALTHY)
    assert s.available(7)


def test_a_noisy_probe_does_not_flap():
    s = server(active=True, rise=2, fall=3)
    probe(s, True, 0)
    for t in range(1, 20):  # fail, fail, pass, fail, fail, pass...: never 3 in a row
        assert probe(s, t % 3 == 0, t, "http_response_timeout") is None
    assert s.state is State.HEALTHY


def test_passive_ejection_needs_max_fails_within_the_window():
    s = server(max_fails=3, fail_window=10.0, eject_for=30.0)
    assert s.on_failure("connection_refused", "x", 0) is None
    assert s.on_failure("connection_refused", "x", 11) is None   # the first one aged out
    assert s.on_failure("connection_refused", "x", 12) is None
    assert s.on_failure("connection_timeout", "x", 13) == (State.UNKNOWN, State.EJECTED)
    assert not s.available(20)
    assert "3 failures in 10 s, last connection_timeout, back in 23 s" in s.out_reason(20)
    assert s.failures_by_cause == {"connection_refused": 3, "connection_timeout": 1}


def test_without_active_checks_one_trial_request_brings_it_back():
    s = server(max_fails=1, eject_for=5.0)
    assert s.on_failure("connection_refused", "x", 0) == (State.UNKNOWN, State.EJECTED)
    assert not s.available(4.9)
    assert s.available(5.0)
    trial = s.on_attempt_start()    # the trial
    assert trial and not s.available(5.0)  # only one at a time
    assert s.on_success(200, 0.01, trial) == (State.EJECTED, State.HEALTHY)
    s.on_attempt_end(trial)
    assert s.available(5.1)


def test_only_the_trial_attempt_decides_the_trial():
    """Regression: the trial marker belonged to the server, so a request that started
    before the ejection could decide the trial or free its slot."""
    s = server(max_fails=1, eject_for=5.0)
    early = s.on_attempt_start()        # in flight before the ejection
    s.on_failure("connection_refused", "x", 0)
    trial = s.on_attempt_start()        # cooled... (picked after 5 s)
    assert trial and not early
    assert s.on_success(200, 0.01, early) is None   # the early one proves nothing
    s.on_attempt_end(early)
    assert s.trial and s.state is State.EJECTED      # the trial slot is still taken
    assert s.on_success(200, 0.01, trial) == (State.EJECTED, State.HEALTHY)
    s.on_attempt_end(trial)


def test_a_failed_trial_ejects_again_and_a_trial_without_verdict_frees_the_slot():
    s = server(max_fails=1, eject_for=5.0)
    s.on_failure("connection_refused", "x", 0)
    trial = s.on_attempt_start()
    assert s.on_failure("connection_refused", "x", 6, trial) is None  # still ejected, for longer
    s.on_attempt_end(trial)
    assert s.state is State.EJECTED and not s.available(10.9) and s.available(11.0)
    trial = s.on_attempt_start()
    s.on_attempt_end(trial)  # client went away: no verdict
    assert s.available(11.0)


def test_with_active_checks_a_passing_probe_ends_an_ejection_only_after_it_ran():
    s = server(active=True, max_fails=1, eject_for=5.0)
    s.on_failure("connection_refused", "x", 0)
    assert probe(s, True, 1) is None          # the ejection runs its course
    assert not s.available(6)                 # cooled, but waits for a probe
    assert "waiting for a passing health check" in s.out_reason(6)
    assert probe(s, True, 6) == (State.EJECTED, State.HEALTHY)


def test_passive_can_be_disabled():
    s = server(max_fails=0)
    for t in range(10):
        assert s.on_failure("connection_refused", "x", t) is None
    assert s.available(10)


def test_latency_window_and_snapshot_shape():
    s = server()
    for ms in range(1, 101):
        s.on_success(200, ms / 1000)
    snap = s.snapshot(idle_connections=2)
    assert snap["latency_ms"] == {"p50": 50.0, "p99": 99.0}
    assert snap["idle_connections"] == 2 and snap["state"] == "unknown"
    assert set(snap) == {"url", "weight", "backup", "state", "health", "active_requests", "idle_connections",
                         "requests_total", "failures_total", "failures_by_error", "last_failure", "latency_ms",
                         "endpoints"}
    assert s.metrics()["responses_by_class"]["2xx"] == 100
    assert s.metrics()["latency"]["count"] == 100


def test_snapshot_times_are_unix_seconds():
    """Regression: last_check and last_failure.at were loop (monotonic) times in /debug."""
    s = server(active=True)
    probe(s, True, 100.0)
    s.on_failure("connection_refused", "x", 101.0)
    snap = s.snapshot(0, wall_offset=1_700_000_000.0)
    assert snap["health"]["last_check"] == 1_700_000_100.0
    assert snap["last_failure"]["at"] == 1_700_000_101.0
    assert s.last_failure["at"] == 101.0  # the live state keeps loop time


def test_unhealthy_reason_while_recovering():
    s = server(active=True, rise=3, fall=1)
    probe(s, False, 0, "connection_refused")
    assert "1 health checks failed, last connection_refused" in s.out_reason(0)
    probe(s, True, 1)
    assert "recovering, 1 of 3 health checks passed" in s.out_reason(1)


def test_failures_make_a_server_expensive_for_p2c():
    s = server(max_fails=0)
    s.on_success(200, 0.001)
    s.on_failure("connection_refused", "x", 0)
    assert s.latency.ewma_ms >= 1000.0


def test_endpoints_rotate_from_the_first():
    s = server()
    assert [s.next_endpoint(["a", "b"]) for _ in range(3)] == ["a", "b", "a"]
    assert s.next_endpoint(["c"]) == "c"
