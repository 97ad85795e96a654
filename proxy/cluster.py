"""Several worker processes as one proxy (`listen.workers > 1`): the pure parts.

The supervisor (proxy/supervisor.py) and each worker (proxy/worker.py) talk over one
AF_UNIX socketpair: messages are orjson objects, each preceded by its length (4 bytes,
network order). What travels:

    supervisor -> worker   {"t": "config", "config": {...}, "source": path, "port": n}
                           {"t": "states", "pools": {pool: [state_of(server), ...]}}
                           {"t": "snapshot", "id": n}
    worker -> supervisor   {"t": "ready", "pid": n}
                           {"t": "reloaded"}
                           {"t": "failure", "pool", "server": index, "url", "error", "details", "trial"}
                           {"t": "trial_ok", "pool", "server": index, "url"}
                           {"t": "snapshot", "id": n, "data": {...}}

Who owns what: server health (active checks, and passive ejection counted across all
workers) lives in the supervisor, which pushes every change to every worker; load,
counters, latency and the failure ring live in the workers, and the admin listener
(in the supervisor) sums them. This module frames the messages, carries a server's
state across, and merges the workers' snapshots; it does no I/O.
"""

from __future__ import annotations

import dataclasses
import struct

import orjson

from proxy.servers import ServerState, State, nearest_rank

_LENGTH = struct.Struct("!I")
MAX_MESSAGE = 64 * 1024 * 1024  # a snapshot is tens of KiB; anything near this is a bug


class ChannelError(Exception):
    """The peer sent something that is not a message: the channel is closed."""


def encode(message: dict) -> bytes:
    body = orjson.dumps(message, default=str)
    return _LENGTH.pack(len(body)) + body


class Decoder:
    """Bytes in, whole messages out (a message may arrive in any number of pieces)."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[dict]:
        buf = self._buf
        buf += data
        out = []
        while len(buf) >= 4:
            (size,) = _LENGTH.unpack_from(buf)
            if size > MAX_MESSAGE:
                raise ChannelError(f"message of {size} bytes announced (limit {MAX_MESSAGE})")
            if len(buf) < 4 + size:
                break
            try:
                message = orjson.loads(bytes(buf[4:4 + size]))
            except orjson.JSONDecodeError as exc:
                raise ChannelError(f"not JSON: {exc}") from None
            del buf[:4 + size]
            if not isinstance(message, dict) or "t" not in message:
                raise ChannelError("a message is an object with a type ('t')")
            out.append(message)
        return out


# -- server health across processes ---------------------------------------------------

def state_of(server: ServerState, now: float) -> dict:
    """What a worker needs to take the same decisions as the supervisor. Times travel as
    durations (each process has its own loop clock)."""
    return {"state": str(server.state), "ejected_for": max(0.0, server.ejected_until - now),
            "eject_reason": server.eject_reason, "consecutive_successes": server.consecutive_successes,
            "consecutive_failures": server.consecutive_failures, "last_error": server.last_error}


def apply_state(server: ServerState, message: dict, now: float) -> None:
    server.state = State(message["state"])
    server.ejected_until = now + message["ejected_for"]
    server.eject_reason = message["eject_reason"]
    server.consecutive_successes = message["consecutive_successes"]
    server.consecutive_failures = message["consecutive_failures"]
    server.last_error = message["last_error"]
    if server.state is not State.EJECTED:
        server.trial = False


# -- merging the workers' snapshots (admin) -----------------------------------------------

def _sum_counts(a: dict, b: dict) -> dict:
    out = dict(a)
    for key, n in b.items():
        out[key] = out.get(key, 0) + n
    return out


def merge_histograms(a: dict | None, b: dict | None) -> dict | None:
    if not a or not b:
        return a or b
    return {"counts": [x + y for x, y in zip(a["counts"], b["counts"])],
            "sum": a["sum"] + b["sum"], "count": a["count"] + b["count"]}


def _matching(pools: dict, pool: str, index: int, key: str, value: str) -> dict | None:
    """The worker's entry for the same server, identified by `key` ("url" in upstream
    snapshots, "address" in metrics); a worker mid-reload may differ: skip it."""
    servers = (pools.get(pool) or {}).get("servers") or []
    if index < len(servers) and servers[index].get(key) == value:
        return servers[index]
    return None


def merge_upstreams(base: dict, workers: list[dict]) -> dict:
    """/debug/upstreams for the whole proxy. `base` is the supervisor's view (health and
    state: the truth); traffic figures are the workers' sums. Each worker server entry
    may carry "latency_samples" (raw ms), merged into one p50/p99."""
    out = {"pools": {}}
    for pool_name, pool in base["pools"].items():
        servers = []
        for index, server in enumerate(pool["servers"]):
            merged = {**server, "active_requests": 0, "idle_connections": 0, "requests_total": 0,
                      "failures_total": 0, "failures_by_error": {}, "last_failure": None}
            samples: list[float] = []
            endpoints = server.get("endpoints") or []
            for snapshot in workers:
                theirs = _matching(snapshot.get("pools") or {}, pool_name, index, "url", server["url"])
                if theirs is None:
                    continue
                for key in ("active_requests", "idle_connections", "requests_total", "failures_total"):
                    merged[key] += theirs.get(key, 0)
                merged["failures_by_error"] = _sum_counts(merged["failures_by_error"],
                                                          theirs.get("failures_by_error") or {})
                last = theirs.get("last_failure")
                if last and (merged["last_failure"] is None or last["at"] > merged["last_failure"]["at"]):
                    merged["last_failure"] = last
                samples.extend(theirs.get("latency_samples") or ())
                endpoints = endpoints or theirs.get("endpoints") or []
            merged["latency_ms"] = nearest_rank(samples)  # as LatencyWindow, over every worker
            merged["endpoints"] = endpoints
            merged.pop("latency_samples", None)
            servers.append(merged)
        out["pools"][pool_name] = {**pool, "servers": servers}
    return out


def merge_metrics(base: dict, workers: list[dict]) -> dict:
    """/metrics for the whole proxy: state and checks from `base` (the supervisor),
    traffic summed over the workers."""
    out = {**base, "client_connections": 0, "retries_total": 0, "keepalive_race_retries_total": 0,
           "generated_errors": {}, "pools": {}}
    for snapshot in workers:
        for key in ("client_connections", "retries_total", "keepalive_race_retries_total"):
            out[key] += snapshot.get(key, 0)
        out["generated_errors"] = _sum_counts(out["generated_errors"], snapshot.get("generated_errors") or {})
    for pool_name, pool in base["pools"].items():
        latency = None
        servers = []
        for index, server in enumerate(pool["servers"]):
            merged = {**server, "responses_by_class": {}, "failures_by_error": {}, "latency": None}
            for snapshot in workers:
                theirs = _matching(snapshot.get("pools") or {}, pool_name, index, "address", server["address"])
                if theirs is None:
                    continue
                merged["responses_by_class"] = _sum_counts(merged["responses_by_class"],
                                                           theirs.get("responses_by_class") or {})
                merged["failures_by_error"] = _sum_counts(merged["failures_by_error"],
                                                          theirs.get("failures_by_error") or {})
                merged["latency"] = merge_histograms(merged["latency"], theirs.get("latency"))
            servers.append(merged)
        for snapshot in workers:
            latency = merge_histograms(latency, ((snapshot.get("pools") or {}).get(pool_name) or {})
                                       .get("request_latency"))
        out["pools"][pool_name] = {**pool, "request_latency": latency, "servers": servers}
    return out


def merge_requests(lists: list[list[dict]], size: int) -> list[dict]:
    """The failure rings of every worker as one, newest first, at most `size` entries."""
    entries = [entry for entries in lists for entry in entries]
    entries.sort(key=lambda e: e.get("at") or 0.0, reverse=True)
    return entries[:size]


class SharedServerState(ServerState):
    """A worker's copy of a server whose health the supervisor owns.

    The worker's policy has `max_fails = 0`, so a failure here never ejects on its own:
    it is reported, the supervisor counts failures from every worker against one
    `max_fails`, and pushes the verdict to all of them. The trial request of a cooled
    ejection (no active checks) is decided where it ran and reported the same way.
    Transitions are logged once, by the supervisor, so these return None."""

    __slots__ = ("report", "key")

    def on_failure(self, token: str, details: str, now: float, trial: bool = False) -> None:
        super().on_failure(token, details, now, trial)
        self.report({"t": "failure", **self.key, "error": token, "details": details, "trial": trial})
        return None

    def on_trial_ok(self) -> None:
        # reached (through on_answered, on_success) for a trial request only: nothing
        # extra per request
        if super().on_trial_ok() is not None:
            self.report({"t": "trial_ok", **self.key})
        return None


def shared_servers(report):
    """A ServerState factory for PoolRuntime in a worker: every server reports to `report`."""
    def make(pool: str, index: int, *args, policy) -> SharedServerState:
        server = SharedServerState(*args, policy=dataclasses.replace(policy, max_fails=0))
        server.report = report
        server.key = {"pool": pool, "server": index, "url": args[0]}
        return server
    return make
