"""The hot-path Histogram (proxy.stats) and the Prometheus text exposition (diagnostics.metrics).

The exposition is parsed back with prometheus_client's reference parser (a test-only
dependency) and also checked line by line against the 0.0.4 grammar, because the
reference parser is lenient about grouping.
"""

from __future__ import annotations

import math
import re

import pytest
from prometheus_client.parser import text_string_to_metric_families

from diagnostics.metrics import DEFAULT_BUCKETS, SERVER_STATES, render_metrics
from proxy.stats import Histogram

# ---- Histogram ---------------------------------------------------------------------------


def test_histogram_bucket_edges_are_inclusive_upper_bounds():
    h = Histogram((0.1, 0.5, 1.0))
    for v in (0.0, 0.1, 0.1000001, 0.5, 0.9999, 1.0):
        h.observe(v)
    # le is inclusive: 0.1 lands in the 0.1 bucket, 0.1000001 in the next one.
    assert h.counts == [2, 2, 2, 0]


def test_histogram_overflow_goes_to_inf_and_sum_count_track_everything():
    h = Histogram((0.1, 0.5, 1.0))
    for v in (1.0000001, 5.0, 1e9):
        h.observe(v)
    h.observe(0.25)
    assert h.counts == [0, 1, 0, 3]
    assert h.count == 4
    assert h.sum == pytest.approx(1.0000001 + 5.0 + 1e9 + 0.25)


def test_histogram_snapshot_is_a_copy_with_the_contract_keys():
    h = Histogram()
    assert len(h.counts) == len(DEFAULT_BUCKETS) + 1
    h.observe(0.003)
    snap = h.snapshot()
    assert set(snap) == {"counts", "sum", "count"}
    assert snap["count"] == 1 and snap["sum"] == pytest.approx(0.003)
    assert snap["counts"][DEFAULT_BUCKETS.index(0.005)] == 1
    h.observe(0.003)
    assert snap["count"] == 1 and sum(snap["counts"]) == 1  # not a live view


def test_histogram_observe_allocates_no_new_storage():
    h = Histogram()
    counts = h.counts
    for v in (0.0001, 0.02, 3.0, 99.0):
        h.observe(v)
    assert h.counts is counts and len(counts) == len(DEFAULT_BUCKETS) + 1


@pytest.mark.parametrize("bounds", [(), (1.0, 1.0), (2.0, 1.0), (1.0, math.inf), (math.nan,)])
def test_histogram_rejects_bad_bounds(bounds):
    with pytest.raises(ValueError):
        Histogram(bounds)


# ---- render_metrics ----------------------------------------------------------------------

BOUNDS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]


def hist(*values: float) -> dict:
    h = Histogram(BOUNDS)
    for v in values:
        h.observe(v)
    return h.snapshot()


WEIRD = 'we"ird\\host\nname:1'


def snapshot() -> dict:
    return {
        "buckets": BOUNDS,
        "client_connections": 7,
        "retries_total": 4,
        "keepalive_race_retries_total": 2,
        "generated_errors": {"destination_unavailable": 3, "connection_refused": 5},
        "pools": {
            "web": {"request_latency": hist(0.002), "servers": [
                {"address": "127.0.0.1:9101", "state": "healthy",
                 "responses_by_class": {"2xx": 1}, "failures_by_error": {},
                 "latency": hist(0.002), "checks": {"pass": 0, "fail": 0}}]},
            "app": {"request_latency": hist(0.0005, 0.003, 0.003, 0.2, 30.0), "servers": [
                {"address": "127.0.0.1:9001", "state": "healthy",
                 "responses_by_class": {"1xx": 0, "2xx": 10, "3xx": 1, "4xx": 2, "5xx": 1},
                 "failures_by_error": {"http_response_timeout": 1},
                 "latency": hist(0.0005, 0.003, 0.2), "checks": {"pass": 12, "fail": 1}},
                {"address": "127.0.0.1:9002", "state": "ejected",
                 "responses_by_class": {"2xx": 0},
                 "failures_by_error": {"connection_refused": 3, "connection_terminated": 1},
                 "latency": hist(), "checks": {"pass": 0, "fail": 4}},
                {"address": WEIRD, "state": "unknown", "responses_by_class": {},
                 "failures_by_error": {}, "latency": hist(), "checks": {}},
                {"address": "127.0.0.1:9004", "state": "unhealthy", "responses_by_class": {},
                 "failures_by_error": {"connection_timeout": 2}, "latency": hist(),
                 "checks": {"pass": 1, "fail": 3}}]},
        },
    }


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(text: str, name: str) -> dict[tuple, float]:
    """sample name -> {sorted label items: value}."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def key(**labels) -> tuple:
    return tuple(sorted(labels.items()))


EXPECTED_FAMILIES = {
    # the reference parser names counter families without their _total suffix
    "gatewise_requests": "counter",
    "gatewise_generated_responses": "counter",
    "gatewise_upstream_failures": "counter",
    "gatewise_server_up": "gauge",
    "gatewise_server_state": "gauge",
    "gatewise_upstream_latency_seconds": "histogram",
    "gatewise_request_duration_seconds": "histogram",
    "gatewise_health_checks": "counter",
    "gatewise_client_connections": "gauge",
    "gatewise_retries": "counter",
    "gatewise_keepalive_race_retries": "counter",
}


def test_every_family_is_present_with_its_type():
    fams = families(render_metrics(snapshot()))
    assert {name: f.type for name, f in fams.items()} == EXPECTED_FAMILIES
    assert all(f.documentation for f in fams.values())


_SAMPLE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\\n]|\\[\\"n])*",?)*\})? '
                     r"(-?[0-9.e+-]+|NaN|[+-]Inf)$")


def test_text_follows_the_0_0_4_grammar_line_by_line():
    text = render_metrics(snapshot())
    assert text.endswith("\n") and not text.endswith("\n\n")
    seen_types: list[str] = []
    current = None
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name not in seen_types, f"TYPE {name} twice"
            seen_types.append(name)
            current = name
            continue
        assert _SAMPLE.match(line), line
        sample_name = line.split("{")[0].split(" ")[0]
        # every sample sits under its own family's TYPE line (samples grouped per family)
        assert sample_name == current or sample_name.removeprefix(current) in ("_bucket", "_sum", "_count"), line
    assert len(seen_types) == len(EXPECTED_FAMILIES)


def test_requests_by_pool_server_and_status_class():
    got = samples(render_metrics(snapshot()), "gatewise_requests_total")
    assert got[key(pool="app", server="127.0.0.1:9001", code="2xx")] == 10
    assert got[key(pool="app", server="127.0.0.1:9001", code="5xx")] == 1
    assert got[key(pool="web", server="127.0.0.1:9101", code="2xx")] == 1
    # every class is emitted, zeros included, for every server
    assert got[key(pool="app", server="127.0.0.1:9004", code="1xx")] == 0
    assert len(got) == 5 * 5


def test_failure_and_generated_counters():
    text = render_metrics(snapshot())
    assert samples(text, "gatewise_upstream_failures_total") == {
        key(pool="app", server="127.0.0.1:9001", error="http_response_timeout"): 1,
        key(pool="app", server="127.0.0.1:9002", error="connection_refused"): 3,
        key(pool="app", server="127.0.0.1:9002", error="connection_terminated"): 1,
        key(pool="app", server="127.0.0.1:9004", error="connection_timeout"): 2,
    }
    assert samples(text, "gatewise_generated_responses_total") == {
        key(error="connection_refused"): 5, key(error="destination_unavailable"): 3}
    assert samples(text, "gatewise_client_connections") == {(): 7}
    assert samples(text, "gatewise_retries_total") == {(): 4}
    assert samples(text, "gatewise_keepalive_race_retries_total") == {(): 2}


def test_server_up_and_state_gauges():
    text = render_metrics(snapshot())
    up = samples(text, "gatewise_server_up")
    assert up[key(pool="app", server="127.0.0.1:9001")] == 1
    assert up[key(pool="app", server="127.0.0.1:9002")] == 0
    assert up[key(pool="app", server=WEIRD)] == 1  # unknown still takes traffic
    assert up[key(pool="app", server="127.0.0.1:9004")] == 0
    state = samples(text, "gatewise_server_state")
    for server, current in [("127.0.0.1:9001", "healthy"), ("127.0.0.1:9002", "ejected"),
                            (WEIRD, "unknown"), ("127.0.0.1:9004", "unhealthy")]:
        values = {s: state[key(pool="app", server=server, state=s)] for s in SERVER_STATES}
        assert values == {s: (1 if s == current else 0) for s in SERVER_STATES}


def test_health_checks_by_result():
    got = samples(render_metrics(snapshot()), "gatewise_health_checks_total")
    assert got[key(pool="app", server="127.0.0.1:9001", result="pass")] == 12
    assert got[key(pool="app", server="127.0.0.1:9001", result="fail")] == 1
    assert got[key(pool="app", server=WEIRD, result="fail")] == 0


def _buckets(text: str, name: str, **labels) -> list[tuple[float, float]]:
    got = samples(text, f"{name}_bucket")
    rows = [(float(dict(k)["le"]), v) for k, v in got.items()
            if {a: b for a, b in k if a != "le"} == labels]
    return sorted(rows)


@pytest.mark.parametrize("name,labels,observed", [
    ("gatewise_request_duration_seconds", {"pool": "app"}, [0.0005, 0.003, 0.003, 0.2, 30.0]),
    ("gatewise_upstream_latency_seconds", {"pool": "app", "server": "127.0.0.1:9001"}, [0.0005, 0.003, 0.2]),
    ("gatewise_upstream_latency_seconds", {"pool": "app", "server": "127.0.0.1:9002"}, []),
])
def test_histograms_are_cumulative_monotonic_and_end_at_count(name, labels, observed):
    text = render_metrics(snapshot())
    rows = _buckets(text, name, **labels)
    assert [le for le, _ in rows] == [float(b) for b in BOUNDS] + [math.inf]
    values = [v for _, v in rows]
    assert values == sorted(values), "buckets must be monotonic"
    # each cumulative bucket counts the observations <= le
    assert values == [sum(1 for o in observed if o <= le) for le, _ in rows]
    key_ = key(**labels)
    assert samples(text, f"{name}_count")[key_] == len(observed) == values[-1]
    assert samples(text, f"{name}_sum")[key_] == pytest.approx(sum(observed))


def test_label_values_are_escaped():
    text = render_metrics(snapshot())
    assert 'server="we\\"ird\\\\host\\nname:1"' in text
    assert "\nname:1" not in text  # the raw newline never reaches the output
    got = samples(text, "gatewise_server_up")
    assert key(pool="app", server=WEIRD) in got  # and the parser gets the original back


def test_pool_names_with_specials_are_escaped_too():
    m = snapshot()
    m["pools"]['a"b\\c\nd'] = m["pools"].pop("web")
    got = samples(render_metrics(m), "gatewise_request_duration_seconds_count")
    assert key(pool='a"b\\c\nd') in got


def test_output_is_deterministic_regardless_of_dict_order():
    a = snapshot()
    b = snapshot()
    b["pools"] = dict(reversed(list(b["pools"].items())))
    b["generated_errors"] = dict(reversed(list(b["generated_errors"].items())))
    for s in b["pools"]["app"]["servers"]:
        s["failures_by_error"] = dict(reversed(list(s["failures_by_error"].items())))
    assert render_metrics(a) == render_metrics(b)
    text = render_metrics(a)
    assert text.index('pool="app"') < text.index('pool="web"')


def test_empty_snapshot_still_renders_every_family():
    text = render_metrics({"buckets": BOUNDS, "pools": {}, "generated_errors": {}})
    for name in EXPECTED_FAMILIES:
        full = name + ("_total" if EXPECTED_FAMILIES[name] == "counter" else "")
        assert f"# TYPE {full} " in text
    list(text_string_to_metric_families(text))  # parses
    assert "gatewise_client_connections 0\n" in text


def test_histogram_with_wrong_number_of_counts_is_refused():
    m = snapshot()
    m["pools"]["app"]["request_latency"] = {"counts": [1, 2], "sum": 0.1, "count": 3}
    with pytest.raises(ValueError, match="request_latency"):
        render_metrics(m)
