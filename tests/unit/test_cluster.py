"""proxy/cluster.py, the pure half of `listen.workers > 1`: message framing, a server's
health state carried from the supervisor to a worker, a worker's server that reports
instead of deciding, and the merge of the workers' snapshots into one /debug and /metrics.
No sockets, fake time."""

from __future__ import annotations

import asyncio
import struct
from types import SimpleNamespace
from pathlib import Path

import orjson
import pytest

from proxy.config import config_from_urls
from proxy.runtime import Proxy
from proxy.supervisor import Supervisor
from proxy.cluster import (MAX_MESSAGE, ChannelError, Decoder, SharedServerState, apply_state, encode,
                           merge_histograms, merge_metrics, merge_requests, merge_upstreams, shared_servers,
                           state_of)
from proxy.servers import HealthPolicy, ServerState, State, nearest_rank
from proxy.stats import Histogram

URL_A, URL_B = "http://127.0.0.1:9001", "http://127.0.0.1:9002"


def server(url: str = URL_A, **policy) -> ServerState:
    port = int(url.rsplit(":", 1)[1])
    return ServerState(url, "127.0.0.1", port, policy=HealthPolicy(**policy))


# ---- framing -------------------------------------------------------------------------------

MESSAGES = [{"t": "ready", "pid": 4242},
            {"t": "failure", "pool": "app", "server": 1, "url": URL_B, "error": "connection_refused",
             "details": "connect ECONNREFUSED … ü", "trial": False},
            {"t": "snapshot", "id": 7, "data": {"pools": {}, "nested": [1, 2.5, None, "x" * 300]}}]


def test_encode_is_a_4_byte_big_endian_length_then_the_json():
    data = encode({"t": "ready", "pid": 1})
    (size,) = struct.unpack("!I", data[:4])
    assert size == len(data) - 4
    assert orjson.loads(data[4:]) == {"t": "ready", "pid": 1}


def test_messages_split_at_every_byte_boundary_come_out_whole_and_in_order():
    stream = b"".join(encode(m) for m in MESSAGES)
    for cut in range(len(stream) + 1):
        decoder = Decoder()
        got = decoder.feed(stream[:cut]) + decoder.feed(stream[cut:])
        assert got == MESSAGES, cut
    for cut1 in range(0, len(stream), 7):  # three pieces too (a coarser grid: quadratic)
        for cut2 in range(cut1, len(stream) + 1, 11):
            decoder = Decoder()
            got = decoder.feed(stream[:cut1]) + decoder.feed(stream[cut1:cut2]) + decoder.feed(stream[cut2:])
            assert got == MESSAGES, (cut1, cut2)


def test_one_byte_at_a_time_yields_each_message_exactly_when_its_last_byte_arrives():
    decoder = Decoder()
    ends = set()
    offset = 0
    for m in MESSAGES:
        offset += len(encode(m))
        ends.add(offset)
    stream = b"".join(encode(m) for m in MESSAGES)
    got = []
    for i in range(len(stream)):
        out = decoder.feed(stream[i:i + 1])
        if i + 1 in ends:
            assert len(out) == 1, i
        else:
            assert out == [], i
        got += out
    assert got == MESSAGES


def test_several_messages_in_one_chunk_and_a_partial_tail_kept_for_later():
    stream = b"".join(encode(m) for m in MESSAGES)
    tail = encode({"t": "reloaded"})
    decoder = Decoder()
    assert decoder.feed(stream + tail[:2]) == MESSAGES   # half a length prefix stays buffered
    assert decoder.feed(tail[2:-1]) == []
    assert decoder.feed(tail[-1:]) == [{"t": "reloaded"}]
    assert decoder.feed(b"") == []


def test_an_oversized_announcement_is_refused_before_its_body_arrives():
    decoder = Decoder()
    with pytest.raises(ChannelError, match="announced"):
        decoder.feed(struct.pack("!I", MAX_MESSAGE + 1))
    assert Decoder().feed(struct.pack("!I", MAX_MESSAGE)) == []  # the limit itself is allowed (waits)


def test_an_oversized_announcement_after_a_good_message_still_raises():
    decoder = Decoder()
    with pytest.raises(ChannelError):
        decoder.feed(encode({"t": "ready", "pid": 1}) + struct.pack("!I", 0xFFFFFFFF))


@pytest.mark.parametrize("body", [b"not json", b"{\"t\": ", b"\xff\xfe"])
def test_a_body_that_is_not_json_is_a_channel_error(body):
    with pytest.raises(ChannelError, match="not JSON"):
        Decoder().feed(struct.pack("!I", len(body)) + body)


@pytest.mark.parametrize("value", [[1, 2], "t", 3, None, {"type": "ready"}])
def test_json_that_is_not_a_typed_object_is_a_channel_error(value):
    body = orjson.dumps(value)
    with pytest.raises(ChannelError, match="object with a type"):
        Decoder().feed(struct.pack("!I", len(body)) + body)


def test_encode_turns_unknown_objects_into_strings():
    # default=str: a stray State or Path in a snapshot must not kill the channel
    assert Decoder().feed(encode({"t": "x", "state": State.EJECTED})) == [{"t": "x", "state": "ejected"}]
    # (orjson writes a StrEnum by itself: the Path is what needs default=str)
    assert Decoder().feed(encode({"t": "x", "path": Path("/x")})) == [{"t": "x", "path": "/x"}]


# ---- a server's state across processes --------------------------------------------------

def ejected_server(now: float) -> ServerState:
    s = server(max_fails=1, eject_for=30.0)
    s.on_failure("connection_refused", "connect ECONNREFUSED", now)
    assert s.state is State.EJECTED
    s.consecutive_failures, s.consecutive_successes, s.last_error = 2, 0, "connection_refused"
    return s


def test_state_round_trip_carries_ejection_as_a_duration_between_clocks():
    sup = ejected_server(now=100.0)                      # ejected until 130 on the supervisor's clock
    message = state_of(sup, now=110.0)
    assert message["ejected_for"] == pytest.approx(20.0)
    message = Decoder().feed(encode({"t": "states", "servers": [["app", 0, message]]}))[0]["servers"][0][2]
    worker = server()
    apply_state(worker, message, now=5000.0)             # another process, another clock
    assert worker.state is State.EJECTED
    assert worker.ejected_until == pytest.approx(5020.0)
    assert worker.eject_reason == sup.eject_reason and "connection_refused" in worker.eject_reason
    assert (worker.consecutive_failures, worker.consecutive_successes, worker.last_error) == \
        (2, 0, "connection_refused")
    assert not worker.available(5019.9) and worker.available(5020.0)   # cooled: one trial allowed
    assert state_of(worker, 5000.0) == {**state_of(sup, 110.0), "ejected_for": pytest.approx(20.0)}


def test_ejected_for_is_never_negative():
    sup = ejected_server(now=0.0)
    assert state_of(sup, now=1000.0)["ejected_for"] == 0.0
    healthy = server()
    assert state_of(healthy, now=50.0)["ejected_for"] == 0.0


def test_a_trial_in_flight_is_cleared_only_when_the_server_is_no_longer_ejected():
    sup = ejected_server(now=0.0)
    worker = server()
    apply_state(worker, state_of(sup, 0.0), now=0.0)
    worker.trial = True                                  # this worker's trial request is in flight
    apply_state(worker, state_of(sup, 1.0), now=1.0)     # still ejected: the trial stays ours
    assert worker.trial is True
    assert sup.on_trial_ok() == (State.EJECTED, State.HEALTHY)
    apply_state(worker, state_of(sup, 2.0), now=2.0)
    assert worker.state is State.HEALTHY and worker.trial is False and worker.eject_reason == ""
    assert worker.available(2.0)


def test_unhealthy_travels_with_its_check_counters():
    sup = server(active=True, fall=1)
    sup.on_probe(False, 1.0, status=503, error="unexpected_status", latency_ms=1.0)
    worker = server(active=True, fall=1)
    apply_state(worker, state_of(sup, 1.0), now=9.0)
    assert worker.state is State.UNHEALTHY and not worker.available(9.0)
    assert worker.consecutive_failures == 1 and worker.last_error == "unexpected_status"


# ---- a worker's server: reports, never decides -------------------------------------------

def shared(policy: HealthPolicy, reports: list, index: int = 1) -> SharedServerState:
    make = shared_servers(reports.append)
    return make("app", index, URL_B, "127.0.0.1", 9002, 1, False, policy=policy)


def test_a_worker_failure_is_reported_and_never_ejects_locally():
    reports: list[dict] = []
    s = shared(HealthPolicy(max_fails=1, fail_window=10.0, eject_for=30.0), reports)
    assert isinstance(s, SharedServerState)
    assert s.policy.max_fails == 0 and s.policy.eject_for == 30.0   # only max_fails is the supervisor's
    for t in range(5):
        assert s.on_failure("connection_refused", f"try {t}", float(t)) is None
    assert s.state is State.UNKNOWN and s.available(5.0)
    assert s.failures_total == 5 and s.failures_by_cause == {"connection_refused": 5}  # for the snapshot
    assert reports == [{"t": "failure", "pool": "app", "server": 1, "url": URL_B, "error": "connection_refused",
                        "details": f"try {t}", "trial": False} for t in range(5)]
    # every report is a message the channel can carry
    assert Decoder().feed(b"".join(encode(r) for r in reports)) == reports


def test_a_trial_success_is_reported_as_trial_ok_and_returns_none():
    reports: list[dict] = []
    s = shared(HealthPolicy(max_fails=1), reports, index=0)
    apply_state(s, state_of(ejected_server(0.0), 40.0), now=40.0)   # cooled ejection
    assert s.available(40.0)
    trial = s.on_attempt_start()
    assert trial is True and not s.available(40.0)                   # one trial at a time
    assert s.on_answered(200, 0.01, trial) is None   # the per-request entry (forward.Attempt)
    assert reports == [{"t": "trial_ok", "pool": "app", "server": 0, "url": URL_B}]


def test_an_ordinary_success_reports_nothing():
    reports: list[dict] = []
    s = shared(HealthPolicy(), reports)
    for _ in range(3):
        assert s.on_success(200, 0.002) is None
    assert reports == [] and s.responses_by_class[2] == 3


def test_a_failed_trial_is_reported_as_a_trial_failure():
    reports: list[dict] = []
    s = shared(HealthPolicy(max_fails=1), reports)
    apply_state(s, state_of(ejected_server(0.0), 40.0), now=40.0)
    trial = s.on_attempt_start()
    assert s.on_failure("connection_refused", "still down", 40.0, trial) is None
    assert reports == [{"t": "failure", "pool": "app", "server": 1, "url": URL_B, "error": "connection_refused",
                        "details": "still down", "trial": True}]
    # the supervisor, told so, ejects again for eject_for
    sup = ejected_server(0.0)
    assert sup.on_failure("connection_refused", "still down", 40.0, trial=True) is None
    assert sup.state is State.EJECTED and sup.ejected_until == pytest.approx(70.0)


def test_on_trial_ok_brings_an_ejected_server_back_once():
    s = ejected_server(0.0)
    s.trial = True
    assert s.on_trial_ok() == (State.EJECTED, State.HEALTHY)
    assert s.trial is False and s.eject_reason == "" and s.available(0.0)
    assert s.on_trial_ok() is None        # not ejected: nothing changes, nothing to log
    unknown = server()
    assert unknown.on_trial_ok() is None  # unknown stays unknown
    assert unknown.state is State.UNKNOWN


# ---- merging the workers' snapshots ---------------------------------------------------------

def upstream_entry(s: ServerState, samples: list[float] = ()) -> dict:
    entry = s.snapshot(idle_connections=0)
    entry["latency_samples"] = list(samples)
    return entry


def worker_upstreams(*servers: dict) -> dict:
    return {"pools": {"app": {"balance": "weighted_round_robin", "servers": list(servers)}}}


def test_merge_upstreams_sums_traffic_and_keeps_the_supervisors_health():
    sup_a, sup_b = server(URL_A), ejected_server(0.0)
    sup_b.url = URL_B
    base = {"pools": {"app": {"balance": "weighted_round_robin",
                              "servers": [sup_a.snapshot(0), {**sup_b.snapshot(0), "url": URL_B}]}}}
    w1a, w1b, w2a, w2b = server(URL_A), server(URL_B), server(URL_A), server(URL_B)
    w1a.requests_total, w1a.failures_total, w1a.failures_by_cause = 10, 1, {"connection_reset": 1}
    w1a.last_failure = {"at": 5.0, "error": "connection_reset", "details": "old"}
    w2a.requests_total, w2a.failures_total, w2a.failures_by_cause = 7, 3, {"connection_reset": 2,
                                                                            "http_response_timeout": 1}
    w2a.last_failure = {"at": 9.0, "error": "http_response_timeout", "details": "newest"}
    w2a.active_requests = 2
    w1b.requests_total, w1b.failures_total, w1b.failures_by_cause = 1, 1, {"connection_refused": 1}
    w1a.endpoints = ["127.0.0.1"]
    workers = [worker_upstreams(upstream_entry(w1a, [float(i) for i in range(1, 61)]), upstream_entry(w1b)),
               worker_upstreams(upstream_entry(w2a, [float(i) for i in range(61, 101)]), upstream_entry(w2b))]
    merged = merge_upstreams(base, workers)
    a, b = merged["pools"]["app"]["servers"]
    assert merged["pools"]["app"]["balance"] == "weighted_round_robin"
    assert (a["requests_total"], a["failures_total"], a["active_requests"]) == (17, 4, 2)
    assert a["failures_by_error"] == {"connection_reset": 3, "http_response_timeout": 1}
    assert a["last_failure"]["details"] == "newest"
    # p50/p99 of all 100 samples (1..100), not an average of the workers' own (30.5 and 80.5)
    assert a["latency_ms"] == {"p50": 50.0, "p99": 99.0}
    assert a["endpoints"] == ["127.0.0.1:9001"]     # the supervisor had none: a worker's
    assert "latency_samples" not in a and "latency_samples" not in b
    # health is the supervisor's: the workers' copies say unknown, the truth is ejected
    assert a["state"] == "unknown" and b["state"] == "ejected"
    assert b["requests_total"] == 1 and b["failures_by_error"] == {"connection_refused": 1}
    assert b["latency_ms"] == {"p50": None, "p99": None}


def test_merge_upstreams_skips_a_worker_whose_server_differs():
    base = {"pools": {"app": {"balance": "random", "servers": [server(URL_A).snapshot(0),
                                                                   server(URL_B).snapshot(0)]}}}
    good, stale = server(URL_A), server("http://127.0.0.1:9999")
    good.requests_total = stale.requests_total = 5
    mid_reload = worker_upstreams(upstream_entry(good, [1.0]), upstream_entry(stale, [500.0]))
    short = worker_upstreams(upstream_entry(good, [2.0]))   # an older config with one server
    merged = merge_upstreams(base, [mid_reload, short, {"pools": {}}])
    a, b = merged["pools"]["app"]["servers"]
    assert a["requests_total"] == 10 and a["latency_ms"] == {"p50": 1.0, "p99": 1.0}
    assert b["requests_total"] == 0 and b["latency_ms"] == {"p50": None, "p99": None}
    assert b["url"] == URL_B


def test_merge_upstreams_with_no_workers_is_the_supervisors_view_with_zero_traffic():
    sup = server()
    sup.requests_total = 99   # the supervisor never serves: its own counters are not traffic
    merged = merge_upstreams({"pools": {"app": {"servers": [sup.snapshot(0)]}}}, [])
    entry = merged["pools"]["app"]["servers"][0]
    assert entry["requests_total"] == 0 and entry["failures_by_error"] == {} and entry["last_failure"] is None


def test_percentiles_are_nearest_rank_like_latency_window():
    assert nearest_rank([]) == {"p50": None, "p99": None}
    samples = [float(v) for v in (7, 1, 3, 9, 5)]
    s = server()
    for v in samples:
        s.latency.add(v)
    assert nearest_rank(samples) == {"p50": 5.0, "p99": 7.0}        # what the merge uses
    assert s.latency.percentiles() == {"p50": 5.0, "p99": 7.0}      # what one process shows


def metrics_entry(s: ServerState) -> dict:
    return s.metrics()


def test_merge_histograms():
    h1, h2 = Histogram((0.1, 1.0)), Histogram((0.1, 1.0))
    for v in (0.05, 0.5):
        h1.observe(v)
    for v in (0.5, 5.0, 0.01):
        h2.observe(v)
    merged = merge_histograms(h1.snapshot(), h2.snapshot())
    assert merged["counts"] == [2, 2, 1] and merged["count"] == 5
    assert merged["sum"] == pytest.approx(0.05 + 0.5 + 0.5 + 5.0 + 0.01)
    assert merge_histograms(None, h1.snapshot()) == h1.snapshot()
    assert merge_histograms(h2.snapshot(), None) == h2.snapshot()
    assert merge_histograms(None, None) is None


def test_merge_metrics_sums_counters_and_histograms_and_keeps_checks_from_the_supervisor():
    sup = server(active=True, fall=1)
    sup.on_probe(True, 1.0, status=200, error=None, latency_ms=1.0)
    sup.on_probe(False, 2.0, status=503, error="unexpected_status", latency_ms=1.0)
    base = {"buckets": [0.1, 1.0], "client_connections": 0, "retries_total": 0,
            "keepalive_race_retries_total": 0, "generated_errors": {},
            "pools": {"app": {"request_latency": Histogram((0.1, 1.0)).snapshot(),
                              "servers": [metrics_entry(sup)]}}}
    workers = []
    for n, (ok, errors, conns) in enumerate([(3, {"connection_refused": 2}, 4), (5, {"connection_refused": 1,
                                                                                    "http_response_timeout": 1}, 1)]):
        w = server(URL_A)
        w.upstream_latency = Histogram((0.1, 1.0))
        for _ in range(ok):
            w.on_success(200, 0.05)
        w.on_success(503, 0.5)
        for token, count in errors.items():
            for _ in range(count):
                w.on_failure(token, "", 0.0)
        req_latency = Histogram((0.1, 1.0))
        req_latency.observe(0.05 * (n + 1))
        workers.append({"client_connections": conns, "retries_total": n + 1, "keepalive_race_retries_total": n,
                        "generated_errors": errors,
                        "pools": {"app": {"request_latency": req_latency.snapshot(),
                                          "servers": [metrics_entry(w)]}}})
    merged = merge_metrics(base, workers)
    assert merged["buckets"] == [0.1, 1.0]
    assert (merged["client_connections"], merged["retries_total"], merged["keepalive_race_retries_total"]) == (5, 3, 1)
    assert merged["generated_errors"] == {"connection_refused": 3, "http_response_timeout": 1}
    entry = merged["pools"]["app"]["servers"][0]
    assert entry["responses_by_class"] == {"1xx": 0, "2xx": 8, "3xx": 0, "4xx": 0, "5xx": 2}
    assert entry["failures_by_error"] == {"connection_refused": 3, "http_response_timeout": 1}
    assert entry["latency"]["counts"] == [8, 2, 0] and entry["latency"]["count"] == 10
    assert entry["checks"] == {"pass": 1, "fail": 1} and entry["state"] == "unhealthy"
    assert merged["pools"]["app"]["request_latency"]["counts"] == [2, 0, 0]


def test_merge_metrics_skips_a_worker_whose_server_address_differs():
    sup = server(URL_A)
    base = {"client_connections": 0, "retries_total": 0, "keepalive_race_retries_total": 0,
            "generated_errors": {}, "pools": {"app": {"request_latency": None, "servers": [metrics_entry(sup)]}}}
    other = server("http://127.0.0.1:9999")
    other.on_success(200, 0.01)
    merged = merge_metrics(base, [{"client_connections": 2, "pools": {"app": {"servers": [metrics_entry(other)]}}},
                                  {"pools": {}}])
    entry = merged["pools"]["app"]["servers"][0]
    assert merged["client_connections"] == 2          # the process counters still count
    assert entry["responses_by_class"] == {} and entry["latency"] is None
    assert merged["pools"]["app"]["request_latency"] is None


def test_merge_requests_is_newest_first_and_capped():
    w0 = [{"request_id": f"a{i}", "at": 100.0 + 2 * i} for i in (4, 3, 2, 1, 0)]   # each ring newest first
    w1 = [{"request_id": f"b{i}", "at": 101.0 + 2 * i} for i in (4, 3, 2, 1, 0)]
    merged = merge_requests([w0, w1], size=6)
    assert [e["request_id"] for e in merged] == ["b4", "a4", "b3", "a3", "b2", "a2"]
    assert len(merge_requests([w0, w1], size=256)) == 10
    assert merge_requests([], size=5) == [] and merge_requests([[], []], size=5) == []
    assert merge_requests([[{"request_id": "no-time"}], w0[:1]], size=5)[-1]["request_id"] == "no-time"


async def test_the_supervisor_pushes_a_passive_verdict_exactly_when_what_workers_see_changes():
    """A worker's passive report reaches every worker as a state only when it changes
    what they see: not for a failure that only counts towards max_fails (not even one
    reported as a trial's, arriving after the server is back in), yes for the ejection,
    and yes for a failed trial, which moves the ejection on without a state change (so
    the other workers hold back their own trials)."""
    cfg = config_from_urls([URL_A], listen="127.0.0.1:0", admin="127.0.0.1:0", workers=2)
    sup = Supervisor(cfg)
    sup.proxy = Proxy(cfg, asyncio.get_running_loop())
    sent: list[dict] = []
    for handle in sup.workers:  # stand-ins for the channels and processes of two live workers
        handle.channel = SimpleNamespace(send=sent.append)
        handle.process = SimpleNamespace(returncode=None)
    (server,) = sup.proxy.pools["default"].servers
    failure = {"t": "failure", "pool": "default", "server": 0, "url": server.url,
               "error": "connection_refused", "details": "ECONNREFUSED", "trial": False}
    max_fails = server.policy.max_fails
    assert max_fails >= 2
    sup._passive(sup.workers[1], {**failure, "trial": True})  # a late trial report: the server is in
    assert sent == []                                   # counted, nothing to tell
    for _ in range(max_fails - 2):
        sup._passive(sup.workers[0], failure)
    assert sent == []                                   # counted, nothing to tell
    sup._passive(sup.workers[0], failure)               # the one that ejects
    assert [m["servers"][0][2]["state"] for m in sent] == ["ejected"] * 2
    sent.clear()
    now = sup.proxy.loop.time()
    server.ejected_until = now                          # cooled: a trial may go
    sup._passive(sup.workers[1], {**failure, "trial": True})
    assert len(sent) == 2 and {m["servers"][0][2]["state"] for m in sent} == {"ejected"}
    assert all(m["servers"][0][2]["ejected_for"] > 0 for m in sent)  # out for another period
