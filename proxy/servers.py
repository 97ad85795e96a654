"""Per-server state and counters (pure: no I/O, time is passed in).

A ServerState is the one live object per configured server. The balancer reads it,
forward.py updates it at the start and end of each attempt, and the admin endpoints
(issue 3) snapshot it. Health transitions (active and passive checks) arrive in issue 3;
until then every server is considered available.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True, eq=False)
class ServerState:
    url: str                 # as configured, e.g. "http://127.0.0.1:9001"
    host: str
    port: int
    weight: int = 1
    backup: bool = False
    # live load
    active_requests: int = 0
    # counters
    requests_total: int = 0
    failures_total: int = 0
    failures_by_cause: dict[str, int] = field(default_factory=dict)
    last_failure: dict | None = None
    # smooth weighted round-robin bookkeeping (owned by the balancer)
    current_weight: int = 0

    @property
    def address(self) -> str:
        """"host:port" as shown in Proxy-Status next-hop and /debug (IPv6 bracketed)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def available(self, now: float) -> bool:
        return True

    def on_attempt_start(self) -> None:
        self.active_requests += 1
        self.requests_total += 1

    def on_attempt_end(self) -> None:
        self.active_requests -= 1

    def on_failure(self, token: str, details: str, now: float) -> None:
        self.failures_total += 1
        self.failures_by_cause[token] = self.failures_by_cause.get(token, 0) + 1
        self.last_failure = {"at": now, "error": token, "details": details}
