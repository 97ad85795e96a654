"""/metrics in Prometheus text format 0.0.4.

- `render_metrics(snapshot)`: pure text rendering of the dict the proxy hands the admin app
  (shape in `render_metrics`' docstring). Its histograms are proxy.stats.Histogram
  snapshots: counts per bucket (non-cumulative), which the exposition makes cumulative,
  over DEFAULT_BUCKETS unless the snapshot names its own. Format per
  https://prometheus.io/docs/instrumenting/exposition_formats/ (text 0.0.4).

Rules:
- Deterministic output: families in a fixed order, pools and label values from dicts sorted
  by name, servers in the order the snapshot lists them (config order).
- Label values are escaped (backslash, double quote, newline); HELP text likewise
  (backslash, newline).
- Counters that may be zero are still emitted (every status class, both check results,
  every state), so `rate()` and alerts see a series from the first scrape.
- A histogram whose counts do not match the bucket bounds is a bug upstream of here:
  raise, do not guess.
- Pure: no I/O, never imports `proxy`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

# Upper bounds in seconds: the Prometheus client libraries' defaults (plus 1 ms), which
# cover a loopback hop (~0.1 ms lands in the first bucket) up to a 10 s slow backend.
DEFAULT_BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                      1.0, 2.5, 5.0, 10.0)

SERVER_STATES: tuple[str, ...] = ("healthy", "unhealthy", "ejected", "unknown")
_UP_STATES = frozenset({"healthy", "unknown"})
_STATUS_CLASSES: tuple[str, ...] = ("1xx", "2xx", "3xx", "4xx", "5xx")
_CHECK_RESULTS: tuple[str, ...] = ("pass", "fail")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


# ---- exposition -------------------------------------------------------------------------

_LABEL_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n"})
_HELP_ESCAPES = str.maketrans({"\\": "\\\\", "\n": "\\n"})


def _escape(value: object) -> str:
    return str(value).translate(_LABEL_ESCAPES)


def _number(value: float | int | None) -> str:
    if value is None:
        return "0"
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def _le(bound: float) -> str:
    return repr(float(bound))


class _Out:
    """Collects lines; one family at a time."""

    __slots__ = ("lines",)

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {help_text.translate(_HELP_ESCAPES)}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, labels: Iterable[tuple[str, object]], value) -> None:
        body = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
        self.lines.append(f"{name}{{{body}}} {_number(value)}" if body else f"{name} {_number(value)}")

    def histogram(self, name: str, labels: list[tuple[str, object]], bounds: Sequence[float],
                  hist: dict | None, where: str) -> None:
        hist = hist or {}
        counts = hist.get("counts") or [0] * (len(bounds) + 1)
        if len(counts) != len(bounds) + 1:
            raise ValueError(f"{where}: {len(counts)} bucket counts for {len(bounds)} bounds "
                             f"(expected {len(bounds) + 1}, +Inf last)")
        running = 0
        for bound, n in zip(bounds, counts):
            running += n
            self.sample(f"{name}_bucket", [*labels, ("le", _le(bound))], running)
        running += counts[-1]
        self.sample(f"{name}_bucket", [*labels, ("le", "+Inf")], running)
        self.sample(f"{name}_sum", labels, hist.get("sum", 0.0) or 0.0)
        self.sample(f"{name}_count", labels, hist.get("count", running))


def _servers(m: dict):
    """(pool name, pool dict, server dict) in deterministic order."""
    pools = m.get("pools") or {}
    for pool_name in sorted(pools):
        pool = pools[pool_name] or {}
        for server in pool.get("servers") or ():
            yield pool_name, pool, server


def render_metrics(m: dict) -> str:
    """The Prometheus text exposition (format 0.0.4) of a metrics snapshot.

    ```
    {"buckets": [upper bounds, seconds], "client_connections": n, "retries_total": n,
     "keepalive_race_retries_total": n, "generated_errors": {"<rfc9209 token>": n},
     "pools": {"<pool>": {
         "request_latency": {"counts": [per bucket, +Inf last], "sum": s, "count": n},
         "servers": [{"address", "state", "responses_by_class": {"2xx": n, ...},
                      "failures_by_error": {"<token>": n}, "latency": {...},
                      "checks": {"pass": n, "fail": n}}]}},
     "workers": [{"index", "alive", "restarts", "client_connections", "requests_total"}]}
    ```
    "workers" is there only with listen.workers > 1.
    """
    bounds = tuple(m.get("buckets") or DEFAULT_BUCKETS)
    pools = m.get("pools") or {}
    out = _Out()

    out.family("gatewise_requests_total", "counter",
               "Responses received from upstream servers, by pool, server and status class.")
    for pool_name, _, s in _servers(m):
        by_class = s.get("responses_by_class") or {}
        extra = sorted(k for k in by_class if k not in _STATUS_CLASSES)
        for code in (*_STATUS_CLASSES, *extra):
            out.sample("gatewise_requests_total",
                       [("pool", pool_name), ("server", s.get("address", "")), ("code", code)],
                       by_class.get(code, 0))

    out.family("gatewise_generated_responses_total", "counter",
               "Responses gatewise generated itself instead of an upstream, by RFC 9209 error type.")
    generated = m.get("generated_errors") or {}
    for error in sorted(generated):
        out.sample("gatewise_generated_responses_total", [("error", error)], generated[error])

    out.family("gatewise_upstream_failures_total", "counter",
               "Failed attempts to an upstream server, by RFC 9209 error type.")
    for pool_name, _, s in _servers(m):
        failures = s.get("failures_by_error") or {}
        for error in sorted(failures):
            out.sample("gatewise_upstream_failures_total",
                       [("pool", pool_name), ("server", s.get("address", "")), ("error", error)],
                       failures[error])

    out.family("gatewise_server_up", "gauge",
               "1 when the server may take traffic (state healthy or unknown), else 0.")
    for pool_name, _, s in _servers(m):
        out.sample("gatewise_server_up", [("pool", pool_name), ("server", s.get("address", ""))],
                   1 if s.get("state") in _UP_STATES else 0)

    out.family("gatewise_server_state", "gauge",
               "1 for the server's current state, 0 for the others.")
    for pool_name, _, s in _servers(m):
        state = s.get("state")
        states = SERVER_STATES if state in SERVER_STATES or state is None else (*SERVER_STATES, state)
        for name in states:
            out.sample("gatewise_server_state",
                       [("pool", pool_name), ("server", s.get("address", "")), ("state", name)],
                       1 if name == state else 0)

    out.family("gatewise_upstream_latency_seconds", "histogram",
               "Time from the start of an attempt (connect included) until the upstream's response head arrived.")
    for pool_name, _, s in _servers(m):
        address = s.get("address", "")
        out.histogram("gatewise_upstream_latency_seconds", [("pool", pool_name), ("server", address)],
                      bounds, s.get("latency"), f"pools.{pool_name}.servers[{address}].latency")

    out.family("gatewise_request_duration_seconds", "histogram",
               "Time gatewise spent on a request routed to a pool, all attempts included.")
    for pool_name in sorted(pools):
        out.histogram("gatewise_request_duration_seconds", [("pool", pool_name)], bounds,
                      (pools[pool_name] or {}).get("request_latency"),
                      f"pools.{pool_name}.request_latency")

    out.family("gatewise_health_checks_total", "counter",
               "Active health check probes, by result.")
    for pool_name, _, s in _servers(m):
        checks = s.get("checks") or {}
        for result in _CHECK_RESULTS:
            out.sample("gatewise_health_checks_total",
                       [("pool", pool_name), ("server", s.get("address", "")), ("result", result)],
                       checks.get(result, 0))

    out.family("gatewise_client_connections", "gauge", "Open client connections.")
    out.sample("gatewise_client_connections", (), m.get("client_connections", 0))

    out.family("gatewise_retries_total", "counter",
               "Attempts retried on another (or the same) server after a failure.")
    out.sample("gatewise_retries_total", (), m.get("retries_total", 0))

    out.family("gatewise_keepalive_race_retries_total", "counter",
               "Requests retried on a fresh connection after a pooled keep-alive connection "
               "was found closed by the upstream.")
    out.sample("gatewise_keepalive_race_retries_total", (), m.get("keepalive_race_retries_total", 0))

    workers = m.get("workers")
    if workers:  # listen.workers > 1: the processes behind the sums above
        out.family("gatewise_workers", "gauge", "Worker processes running.")
        out.sample("gatewise_workers", (), sum(1 for w in workers if w.get("alive")))
        out.family("gatewise_worker_restarts_total", "counter",
                   "Times the supervisor restarted a worker that died.")
        for w in workers:
            out.sample("gatewise_worker_restarts_total", [("worker", w.get("index"))], w.get("restarts", 0))
        out.family("gatewise_worker_client_connections", "gauge", "Open client connections, by worker.")
        for w in workers:
            out.sample("gatewise_worker_client_connections", [("worker", w.get("index"))],
                       w.get("client_connections"))
        out.family("gatewise_worker_requests_total", "counter",
                   "Responses received from upstream servers, by worker (since the worker started).")
        for w in workers:
            out.sample("gatewise_worker_requests_total", [("worker", w.get("index"))], w.get("requests_total"))

    out.lines.append("")
    return "\n".join(out.lines)
