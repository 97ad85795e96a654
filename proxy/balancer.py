"""Choosing a server for one attempt (pure: no I/O, time is passed in).

Rules, for every balancing kind:

- A *candidate* is a server with ``s.available(now)`` that is not in ``exclude``.
- Primaries (``backup=False``) are used whenever at least one primary is a candidate.
  Backups are considered only when no primary is, like nginx's ``backup`` parameter.
  Within the chosen group the kind decides.
- ``pick`` returns None when there is no candidate at all.

Kinds:

- ``weighted_round_robin``: nginx's *smooth* weighted round-robin
  (``ngx_http_upstream_get_peer`` in ngx_http_upstream_round_robin.c). On each pick every
  candidate's ``current_weight`` grows by its ``weight``, the largest wins (first in
  config order on a tie), and the winner gives back the candidates' total. With a fixed
  candidate set the picks repeat with period ``sum(weights)`` and every window of that
  length holds each server exactly ``weight`` times; weights 5,1,1 give
  a a b a c a a rather than a burst a a a a a b c.
- ``least_conn``: fewest ``active_requests`` relative to weight (``active/weight``,
  compared by cross-multiplying so no floats); ties are broken by smooth weighted
  round-robin among the tied servers only, as nginx's least_conn module does.
- ``random``: weighted random over the candidates, drawing from the injected
  ``random.Random`` so tests can seed it.
- ``p2c_ewma``: power of two random choices, scored by latency EWMA x (active + 1) / weight.

Weights are integers >= 1; config.py guarantees that and it is not re-checked here.
The smooth round-robin state lives in ``ServerState.current_weight``, so one set of
ServerState objects must be balanced by one balancer.

Hot path: ``pick`` runs once per attempt. The primary/backup split and the random
kind's cumulative weights are computed once at construction; a pick walks a tuple
and builds no list.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections.abc import Collection, Sequence
from itertools import accumulate

from proxy.servers import ServerState


class Balancer:
    """What every kind shares: the primary/backup split, then a per-kind pick within a
    group (_pick_in). (A base class rather than a Protocol: compiled, forward.py's call
    to pick is then a direct one, not a Python method call by name.)"""

    __slots__ = ("_primary", "_backup", "_only")

    def __init__(self, servers: Sequence[ServerState]) -> None:
        self._primary: tuple[ServerState, ...] = tuple(s for s in servers if not s.backup)
        self._backup: tuple[ServerState, ...] = tuple(s for s in servers if s.backup)
        # The sole primary, when there is one: every kind picks it whenever it is a
        # candidate (round-robin weights return to where they were), so no kind is asked.
        self._only: ServerState | None = self._primary[0] if len(self._primary) == 1 else None

    def pick(self, now: float, exclude: Collection[ServerState] = ()) -> ServerState | None:
        """Return the server for the next attempt, or None when none is a candidate.

        ``exclude`` holds the servers this request already tried, so that retries go
        "each on a different server when one exists" (SPEC, ``retries``). Contract with
        the caller: when ``pick(now, exclude)`` returns None and ``exclude`` is not
        empty, every remaining candidate has been tried; the caller may then call
        ``pick(now)`` without ``exclude`` to retry on an already-tried server. A None
        from ``pick(now)`` with an empty ``exclude`` means no server is available
        (503 destination_unavailable).
        """
        only = self._only
        if only is not None and only.available(now) and not (exclude and only in exclude):
            return only
        # Backups are a fallback, never a share of the traffic (nginx `backup`), so the
        # backup group is only walked when the primary group yields nothing.
        chosen = self._pick_in(self._primary, now, exclude)
        if chosen is None and self._backup:
            chosen = self._pick_in(self._backup, now, exclude)
        return chosen

    def _pick_in(
        self, group: tuple[ServerState, ...], now: float, exclude: Collection[ServerState]
    ) -> ServerState | None:
        raise NotImplementedError


class SmoothWeightedRoundRobin(Balancer):
    __slots__ = ()

    def _pick_in(
        self, group: tuple[ServerState, ...], now: float, exclude: Collection[ServerState]
    ) -> ServerState | None:
        best: ServerState | None = None
        total = 0
        for s in group:
            if not s.available(now) or (exclude and s in exclude):
                # Unavailable servers neither gain weight nor count in the total: the
                # remaining servers share the picks smoothly, as in nginx.
                continue
            s.current_weight += s.weight
            total += s.weight
            # Strictly greater: on a tie the first in config order wins (nginx).
            if best is None or s.current_weight > best.current_weight:
                best = s
        if best is not None:
            best.current_weight -= total
        return best


class LeastConn(Balancer):
    __slots__ = ()

    def _pick_in(
        self, group: tuple[ServerState, ...], now: float, exclude: Collection[ServerState]
    ) -> ServerState | None:
        # Pass 1: the lowest active/weight, and how many servers share it.
        best: ServerState | None = None
        first = 0
        tied = 0
        for i, s in enumerate(group):
            if not s.available(now) or (exclude and s in exclude):
                continue
            # a/wa < b/wb  <=>  a*wb < b*wa (weights >= 1): exact, no floats.
            if best is None or s.active_requests * best.weight < best.active_requests * s.weight:
                best, first, tied = s, i, 1
            elif s.active_requests * best.weight == best.active_requests * s.weight:
                tied += 1
        if tied <= 1:
            return best
        # Pass 2, only on a tie: smooth WRR among the tied servers (nginx least_conn does
        # the same), so equally loaded servers still get traffic in weight proportion
        # instead of always the first in config order.
        assert best is not None
        ba, bw = best.active_requests, best.weight
        chosen: ServerState | None = None
        total = 0
        for s in group[first:]:
            if not s.available(now) or (exclude and s in exclude):
                continue
            if s.active_requests * bw != ba * s.weight:
                continue
            s.current_weight += s.weight
            total += s.weight
            if chosen is None or s.current_weight > chosen.current_weight:
                chosen = s
        assert chosen is not None
        chosen.current_weight -= total
        return chosen


class WeightedRandom(Balancer):
    __slots__ = ("_rng", "_primary_cum", "_backup_cum")

    def __init__(self, servers: Sequence[ServerState], rng: random.Random) -> None:
        super().__init__(servers)
        self._rng = rng
        # Cumulative weights per group, for the common case where every server of the
        # group is a candidate: one draw and a bisect.
        self._primary_cum = tuple(accumulate(s.weight for s in self._primary))
        self._backup_cum = tuple(accumulate(s.weight for s in self._backup))

    def _pick_in(
        self, group: tuple[ServerState, ...], now: float, exclude: Collection[ServerState]
    ) -> ServerState | None:
        total = 0
        for s in group:
            if s.available(now) and not (exclude and s in exclude):
                total += s.weight
        if total == 0:
            return None
        r = self._rng.random() * total
        cum = self._primary_cum if group is self._primary else self._backup_cum
        if total == cum[-1]:
            # Every server in the group is a candidate (weights are >= 1, so a full
            # total means none was skipped).
            return group[bisect_right(cum, r)]
        last: ServerState | None = None
        for s in group:
            if not s.available(now) or (exclude and s in exclude):
                continue
            if r < s.weight:
                return s
            r -= s.weight
            last = s
        # Only reachable through float rounding at the very top of the range.
        return last


class PowerOfTwoEwma(Balancer):
    """Power of two random choices (Mitzenmacher; Finagle's and Linkerd's p2c): draw two
    candidates, keep the one with the lower cost = latency EWMA x (active + 1) / weight.
    A slow server quickly gets less traffic without being ejected, and the random pair
    keeps every server sampled, so a recovered one is noticed. A server with no latency
    sample yet costs 0: it is tried first, which is how it gets measured."""

    __slots__ = ("_rng",)

    def __init__(self, servers: Sequence[ServerState], rng: random.Random) -> None:
        super().__init__(servers)
        self._rng = rng

    def _pick_in(
        self, group: tuple[ServerState, ...], now: float, exclude: Collection[ServerState]
    ) -> ServerState | None:
        candidates = [s for s in group if s.available(now) and not (exclude and s in exclude)]
        if len(candidates) <= 1:
            return candidates[0] if candidates else None
        a, b = self._rng.sample(candidates, 2)
        cost_a = a.latency.ewma_ms * (a.active_requests + 1) * b.weight
        cost_b = b.latency.ewma_ms * (b.active_requests + 1) * a.weight
        return a if cost_a <= cost_b else b


def make_balancer(
    kind: str, servers: Sequence[ServerState], *, rng: random.Random | None = None
) -> Balancer:
    """Build the balancer for one pool. ``kind`` is the pool's ``balance`` value.

    ``rng`` is used by ``random`` only; when omitted a private, OS-seeded
    ``random.Random`` is used (never the module-global one, so tests seeding
    ``random`` elsewhere do not couple to us). Unknown kinds raise ValueError; config.py
    rejects them first, so that is a programming error.
    """
    if kind == "weighted_round_robin":
        return SmoothWeightedRoundRobin(servers)
    if kind == "least_conn":
        return LeastConn(servers)
    if kind == "p2c_ewma":
        return PowerOfTwoEwma(servers, rng if rng is not None else random.Random())
    if kind == "random":
        return WeightedRandom(servers, rng if rng is not None else random.Random())
    raise ValueError(f"unknown balance kind {kind!r}")
