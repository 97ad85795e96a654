"""Latency histograms for the hot path (rendered by diagnostics.metrics for /metrics).

Fixed bucket bounds chosen at startup. `observe()` finds the bucket and updates a
preallocated list in place: nothing grows per request. Counts are stored per
bucket (non-cumulative); the exposition makes them cumulative. Compiled with the rest of
the hot path (proxy/compiled.py): observe() runs twice per request.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from diagnostics.metrics import DEFAULT_BUCKETS


class Histogram:
    """Counts of observations per bucket, plus their sum and count.

    `counts[i]` holds observations `bounds[i-1] < v <= bounds[i]` (Prometheus `le` is
    inclusive); the last slot is +Inf.
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float] = DEFAULT_BUCKETS) -> None:
        bounds = tuple(float(b) for b in bounds)
        if not bounds:
            raise ValueError("histogram needs at least one bucket bound")
        if any(not math.isfinite(b) for b in bounds):
            raise ValueError("histogram bounds must be finite (+Inf is implicit)")
        if any(a >= b for a, b in zip(bounds, bounds[1:])):
            raise ValueError("histogram bounds must be strictly increasing")
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    @property
    def count(self) -> int:
        """Observations so far (the buckets' total: not kept apart, observe runs per request)."""
        return sum(self.counts)

    def observe(self, seconds: float) -> None:
        # The first bound >= seconds (bisect_left's answer), found by a scan from the
        # smallest: compiled, a few float compares, where a call to bisect costs more than
        # the whole scan, and a proxy's latencies sit in the first buckets.
        bounds = self.bounds
        i = 0
        n = len(bounds)
        while i < n and bounds[i] < seconds:
            i += 1
        self.counts[i] += 1
        self.sum += seconds

    def snapshot(self) -> dict:
        counts = list(self.counts)
        return {"counts": counts, "sum": self.sum, "count": sum(counts)}
