"""Evidence of failed requests: a bounded ring, and counters by cause.

The request id in every error response leads here (`/debug/requests/<id>`, issue 3).
Memory is bounded by `diagnostics.recent_requests` entries; successes are only counted.
"""

from __future__ import annotations

import time
from collections import OrderedDict


class Recorder:
    __slots__ = ("_ring", "size", "failures_by_error", "keepalive_race_retries", "retries_total")

    def __init__(self, size: int = 256) -> None:
        self._ring: OrderedDict[str, dict] = OrderedDict()
        self.size = size
        self.failures_by_error: dict[str, int] = {}
        self.keepalive_race_retries = 0
        self.retries_total = 0

    def record_failure(self, *, request_id: str, method: str, path: str, status: int, error: str,
                       details: str, attempts: list[dict], hint: str | None = None,
                       at: float | None = None) -> dict:
        entry = {"request_id": request_id, "at": time.time() if at is None else at, "method": method,
                 "path": path, "status": status, "error": error, "details": details,
                 "hint": hint, "attempts": attempts}
        self.failures_by_error[error] = self.failures_by_error.get(error, 0) + 1
        ring = self._ring
        ring.pop(request_id, None)
        ring[request_id] = entry
        while len(ring) > self.size:
            ring.popitem(last=False)
        return entry

    def recent(self) -> list[dict]:
        """Newest first."""
        return list(reversed(self._ring.values()))

    def get(self, request_id: str) -> dict | None:
        return self._ring.get(request_id)
