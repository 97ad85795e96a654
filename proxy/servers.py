"""Per-server state: health, load, latency and counters (pure: time is passed in).

A ServerState is the one live object per configured server. The balancer reads it,
forward.py reports every attempt's outcome, health.py reports every probe, and the
admin endpoints snapshot it.

Health rules (states are the SPEC's names):
    UNKNOWN    no verdict yet; takes traffic (servers start optimistic, as in nginx)
    HEALTHY    takes traffic
    UNHEALTHY  `fall` consecutive failed health checks; back after `rise` passes
    EJECTED    passive: `max_fails` upstream-caused failures within `fail_window`
               take it out for `eject_for`. Afterwards, with active checks, one passing
               probe brings it back; without, one trial request at a time is let
               through: success -> HEALTHY, failure -> ejected again.
Only upstream-caused failures count (never client aborts, never a 4xx or 5xx that the
upstream chose to send). Transitions are returned as (old, new) so the caller logs one
line per change and nothing in steady state (Caddy's setHealthy compare-and-swap).
"""

from __future__ import annotations

from array import array
from collections import deque
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from proxy.compiled import mypyc_attr
from proxy.stats import Histogram


class State(StrEnum):
    UNKNOWN = "unknown"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    EJECTED = "ejected"


# The states as module globals, for the per-request checks: on CPython 3.11 reading a
# member through its class (State.HEALTHY) goes through EnumType.__getattr__'s slow
# attribute hook, about 70 ns, where a global costs a few.
_HEALTHY: Final = State.HEALTHY
_UNKNOWN: Final = State.UNKNOWN
_UNHEALTHY: Final = State.UNHEALTHY
_EJECTED: Final = State.EJECTED


# (state, event) -> next state. Events: probe_ok, probe_down (fall reached), probe_up
# (rise reached), trip (passive threshold), trial_ok, recovered (probe passed after an
# ejection). Anything not listed leaves the state as it is.
_NEXT: Final = {
    (State.UNKNOWN, "probe_ok"): State.HEALTHY,
    (State.UNKNOWN, "probe_down"): State.UNHEALTHY,
    (State.HEALTHY, "probe_down"): State.UNHEALTHY,
    (State.UNHEALTHY, "probe_up"): State.HEALTHY,
    (State.UNKNOWN, "trip"): State.EJECTED,
    (State.HEALTHY, "trip"): State.EJECTED,
    (State.EJECTED, "trial_ok"): State.HEALTHY,
    (State.EJECTED, "recovered"): State.HEALTHY,
}

Transition = tuple[State, State]


@dataclass(frozen=True, slots=True)
class HealthPolicy:
    active: bool = False      # a [pools.X.health] table exists
    rise: int = 2
    fall: int = 3
    max_fails: int = 3        # 0 disables passive ejection
    fail_window: float = 10.0
    eject_for: float = 30.0


# LatencyWindow's size, and the EWMA's weight of the newest sample (reacts within a
# handful of requests). Module constants: add() runs per request, and a class attribute
# read through self is the slow lookup.
_WINDOW: Final = 1024
_LAST: Final = _WINDOW - 1
_ALPHA: Final = 0.3


def nearest_rank(samples) -> dict[str, float | None]:
    """p50 and p99 (nearest rank, ms rounded to 0.01) of latency samples in ms."""
    if not samples:
        return {"p50": None, "p99": None}
    values = sorted(samples)
    last = len(values) - 1
    return {"p50": round(values[int(last * 0.50)], 2), "p99": round(values[int(last * 0.99)], 2)}


class LatencyWindow:
    """The last N latencies in a preallocated ring (no growth per request), plus an
    EWMA for p2c_ewma. Percentiles are computed only when someone looks."""

    __slots__ = ("_ring", "_next", "_count", "ewma_ms")
    PENALTY_MS = 1000.0

    def __init__(self) -> None:
        self._ring = array("d", bytes(8 * _WINDOW))
        self._next = 0
        self._count = 0
        self.ewma_ms = 0.0

    def add(self, ms: float) -> None:
        i = self._next
        self._ring[i] = ms
        self._next = i + 1 if i < _LAST else 0
        count = self._count
        if count < _WINDOW:
            self._count = count + 1
            if not count:
                self.ewma_ms = ms
                return
        self.ewma_ms += _ALPHA * (ms - self.ewma_ms)

    def penalize(self) -> None:
        """A failure costs like a very slow answer, so p2c_ewma steers away from a server
        that fails fast (a refusing server would otherwise look like the fastest)."""
        self.ewma_ms = max(self.ewma_ms * 2, self.PENALTY_MS)

    def samples(self) -> list[float]:
        return self._ring[:self._count].tolist()

    def percentiles(self) -> dict[str, float | None]:
        return nearest_rank(self._ring[:self._count])


@mypyc_attr(allow_interpreted_subclasses=True)  # cluster.SharedServerState, test doubles
class ServerState:
    __slots__ = ("url", "host", "port", "address", "weight", "backup", "policy", "state",
                 "active_requests", "requests_total", "failures_total", "failures_by_cause",
                 "last_failure", "current_weight", "consecutive_successes", "consecutive_failures",
                 "last_check", "last_status", "last_error", "check_latency_ms", "checks_pass",
                 "checks_fail", "_fails", "ejected_until", "eject_reason", "trial", "latency",
                 "responses_by_class", "upstream_latency", "endpoints", "_endpoint")

    def __init__(self, url: str, host: str, port: int, weight: int = 1, backup: bool = False,
                 policy: HealthPolicy | None = None) -> None:
        self.url = url
        self.host = host
        self.port = port
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.weight = weight
        self.backup = backup
        self.policy = policy or HealthPolicy()
        self.state = State.UNKNOWN
        # live load and counters
        self.active_requests = 0
        self.requests_total = 0
        self.failures_total = 0
        self.failures_by_cause: dict[str, int] = {}
        self.last_failure: dict | None = None
        self.responses_by_class = [0] * 6          # index status // 100
        self.latency = LatencyWindow()             # ms, attempt start -> response end
        self.upstream_latency = Histogram()        # seconds, the same, for /metrics
        # smooth weighted round-robin bookkeeping (owned by the balancer)
        self.current_weight = 0
        # active checks
        self.consecutive_successes = 0
        self.consecutive_failures = 0
        self.last_check: float | None = None
        self.last_status: int | None = None
        self.last_error: str | None = None
        self.check_latency_ms: float | None = None
        self.checks_pass = 0
        self.checks_fail = 0
        # passive ejection
        self._fails: deque[float] = deque()
        self.ejected_until = 0.0
        self.eject_reason = ""
        self.trial = False
        # addresses the host resolved to (one for an IP literal); connections rotate
        self.endpoints: list[str] = []
        self._endpoint = 0

    def next_endpoint(self, addresses: list[str]) -> str:
        """Record the current resolution and pick the next address, round robin."""
        self.endpoints = addresses
        index = self._endpoint % len(addresses)
        self._endpoint = index + 1
        return addresses[index]

    # -- the balancer's question ----------------------------------------------------------
    def available(self, now: float) -> bool:
        state = self.state
        if state is _HEALTHY or state is _UNKNOWN:
            return True
        if state is _UNHEALTHY or now < self.ejected_until:
            return False
        # ejected, cooled down: active checks decide; else one trial request at a time
        return not self.policy.active and not self.trial

    def out_reason(self, now: float) -> str:
        """Why this server takes no traffic now (for destination_unavailable details)."""
        if self.state is State.UNHEALTHY:
            if self.consecutive_successes:
                return (f"{self.address} unhealthy: recovering, {self.consecutive_successes} of "
                        f"{self.policy.rise} health checks passed")
            return (f"{self.address} unhealthy: {self.consecutive_failures} health checks failed, "
                    f"last {self.last_error}")
        if self.state is State.EJECTED:
            if now < self.ejected_until:
                return f"{self.address} ejected: {self.eject_reason}, back in {self.ejected_until - now:.0f} s"
            if self.policy.active:
                return f"{self.address} ejected: {self.eject_reason}, waiting for a passing health check"
            return f"{self.address} ejected: {self.eject_reason}, a trial request is in flight"
        return f"{self.address} {self.state}"

    def _to(self, event: str) -> Transition | None:
        new = _NEXT.get((self.state, event))
        if new is None or new is self.state:
            return None
        old, self.state = self.state, new
        if new is not State.EJECTED:
            self._fails.clear()
            self.eject_reason = ""
        return old, new

    # -- live traffic (forward.py) ------------------------------------------------------
    def on_attempt_start(self) -> bool:
        """Count an attempt; True when it is the trial of a cooled ejection (only a
        cooled, check-less ejected server is ever picked). The caller hands the flag back
        with the outcome, so only that attempt decides the trial."""
        self.active_requests += 1
        self.requests_total += 1
        if self.state is _EJECTED:
            self.trial = True
            return True
        return False

    def on_attempt_end(self, trial: bool) -> None:
        self.active_requests -= 1
        if trial:
            self.trial = False  # a trial that ended without a verdict (client gone) frees the slot

    def on_success(self, status: int, head_seconds: float, trial: bool = False) -> Transition | None:
        """A response from the upstream (any status it chose). `head_seconds`: attempt
        start to response head, the latency p50/p99 and p2c_ewma reason about."""
        self.responses_by_class[status // 100 if status < 600 else 5] += 1
        self.latency.add(head_seconds * 1000)
        self.upstream_latency.observe(head_seconds)
        if trial and self.state is _EJECTED:
            return self.on_trial_ok()
        return None

    def on_answered(self, status: int, head_seconds: float, trial: bool) -> Transition | None:
        """on_success, then on_attempt_end, in one call: a response ended the attempt."""
        self.active_requests -= 1
        change = self.on_success(status, head_seconds, trial)
        if trial:
            self.trial = False
        return change

    def on_trial_ok(self) -> Transition | None:
        """The trial request of a cooled ejection got an answer: back in."""
        self.trial = False
        return self._to("trial_ok")

    def on_failure(self, token: str, details: str, now: float, trial: bool = False) -> Transition | None:
        """An upstream-caused failure on live traffic."""
        self.failures_total += 1
        self.failures_by_cause[token] = self.failures_by_cause.get(token, 0) + 1
        self.last_failure = {"at": now, "error": token, "details": details}
        self.latency.penalize()
        policy = self.policy
        if self.state is State.EJECTED:
            if trial:  # the trial failed: out for another period
                self.trial = False
                self.ejected_until = now + policy.eject_for
                self.eject_reason = f"trial request failed with {token}"
            return None
        if policy.max_fails <= 0:
            return None
        fails = self._fails
        fails.append(now)
        while fails and fails[0] <= now - policy.fail_window:
            fails.popleft()
        if len(fails) < policy.max_fails:
            return None
        self.ejected_until = now + policy.eject_for
        self.eject_reason = f"{len(fails)} failures in {policy.fail_window:g} s, last {token}"
        return self._to("trip")

    # -- active checks (health.py) --------------------------------------------------------
    def on_probe(self, ok: bool, now: float, *, status: int | None, error: str | None,
                 latency_ms: float | None) -> Transition | None:
        self.last_check = now
        self.last_status = status
        self.last_error = error
        self.check_latency_ms = latency_ms
        if ok:
            self.checks_pass += 1
            self.consecutive_successes += 1
            self.consecutive_failures = 0
        else:
            self.checks_fail += 1
            self.consecutive_failures += 1
            self.consecutive_successes = 0
        state = self.state
        if state is State.EJECTED:
            # an ejection runs its full course; afterwards one passing probe ends it
            return self._to("recovered") if ok and now >= self.ejected_until else None
        if ok:
            if state is State.UNHEALTHY:
                return self._to("probe_up") if self.consecutive_successes >= self.policy.rise else None
            return self._to("probe_ok")
        if self.consecutive_failures >= self.policy.fall:
            return self._to("probe_down")
        return None

    # -- views ----------------------------------------------------------------------------
    def snapshot(self, idle_connections: int, wall_offset: float = 0.0) -> dict:
        """SPEC's /debug/upstreams entry for this server. Times are kept on the loop's
        monotonic clock; `wall_offset` (time.time() - loop.time()) turns them into unix
        seconds for people and scripts."""
        last_failure = self.last_failure
        if last_failure is not None:
            last_failure = {**last_failure, "at": round(last_failure["at"] + wall_offset, 3)}
        last_check = None if self.last_check is None else round(self.last_check + wall_offset, 3)
        return {
            "url": self.url, "weight": self.weight, "backup": self.backup, "state": str(self.state),
            "health": {"last_check": last_check, "last_status": self.last_status,
                       "last_error": self.last_error, "consecutive_successes": self.consecutive_successes,
                       "consecutive_failures": self.consecutive_failures, "latency_ms": self.check_latency_ms},
            "active_requests": self.active_requests, "idle_connections": idle_connections,
            "requests_total": self.requests_total, "failures_total": self.failures_total,
            "failures_by_error": dict(self.failures_by_cause), "last_failure": last_failure,
            "latency_ms": self.latency.percentiles(),
            "endpoints": [f"[{a}]:{self.port}" if ":" in a else f"{a}:{self.port}" for a in self.endpoints],
        }

    def metrics(self) -> dict:
        by_class = self.responses_by_class
        return {"address": self.address, "state": str(self.state),
                "responses_by_class": {f"{i}xx": by_class[i] for i in range(1, 6)},
                "failures_by_error": dict(self.failures_by_cause),
                "latency": self.upstream_latency.snapshot(),
                "checks": {"pass": self.checks_pass, "fail": self.checks_fail}}
