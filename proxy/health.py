"""Active health checks: one task per server of every pool with a [pools.X.health] table.

The probe goes through the same connect() and UpstreamConnection as live traffic, so a
failed probe has the same RFC 9209 cause as a failed request would (connection_refused,
http_response_timeout, ...). This module only observes; ServerState.on_probe decides.

Probes are spread out: each server's first probe waits a random part of the interval,
and every interval is jittered by ±10%, so a pool's servers are not probed in lockstep
(HAProxy's spread-checks).
"""

from __future__ import annotations

import asyncio
import random
from time import perf_counter

from diagnostics.causes import INFO
from diagnostics.classify import classify
from proxy.errors import ProxyError
from proxy.logs import log_server_state
from proxy.upstream_conn import Peer

JITTER = 0.1


class _ProbeTimeouts:
    """UpstreamConnection's timers, all bounded by the check's own timeout."""

    __slots__ = ("response_header", "idle_read", "upstream_idle")

    def __init__(self, timeout: float) -> None:
        self.response_header = timeout
        self.idle_read = timeout
        self.upstream_idle = 0.0  # (a probe's connection is closed, never pooled)


class _Probe(Peer):
    """Stands in for an Exchange on the upstream connection: wants the status only."""

    __slots__ = ("waiter",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.waiter: asyncio.Future[int] = loop.create_future()

    def on_upstream_head(self, conn, head) -> None:
        if head.status >= 200 and not self.waiter.done():
            self.waiter.set_result(head.status)

    def on_upstream_failed(self, conn, exc: ProxyError) -> None:
        if not self.waiter.done():
            self.waiter.set_exception(exc)

    def on_upstream_body(self, data: bytes) -> None:
        pass

    def on_upstream_end(self, conn, trailers) -> None:
        pass

    def pause_client_reading(self) -> None:
        pass

    def resume_client_reading(self) -> None:
        pass

    def flush(self) -> None:
        pass

    def on_tunnel_open(self, conn, rest: bytes) -> None:  # (a probe asks for no Upgrade)
        pass

    def on_tunnel_data(self, data: bytes) -> None:
        pass

    def on_tunnel_eof(self, conn) -> None:
        pass


class HealthChecker:
    def __init__(self, proxy, pool, cfg, on_probe=None) -> None:
        self.proxy = proxy
        self.pool = pool
        self.cfg = cfg
        self.on_probe = on_probe  # (pool, server) after every probe: the supervisor tells its workers
        self._timeouts = _ProbeTimeouts(cfg.timeout)
        self._tasks: list[asyncio.Task] = []
        self._rng = random.Random()

    def start(self) -> None:
        loop = self.proxy.loop
        self._tasks = [loop.create_task(self._run(server)) for server in self.pool.servers]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _run(self, server) -> None:
        interval = self.cfg.interval
        await asyncio.sleep(self._rng.uniform(0, interval))
        while True:
            await self.probe(server)
            await asyncio.sleep(interval * self._rng.uniform(1 - JITTER, 1 + JITTER))

    async def probe(self, server) -> None:
        """One check: GET the health path and judge the status."""
        loop = self.proxy.loop
        cfg = self.cfg
        started = perf_counter()
        status = None
        try:
            status = await self._get(server)
        except ProxyError as exc:
            ok, error, details = False, INFO[classify(exc)].token, exc.detail
        else:
            low, high = cfg.expect_status
            ok = low <= status <= high
            error = None if ok else "unexpected_status"
            details = None if ok else f"status {status}, expected {low}-{high}"
        change = server.on_probe(ok, loop.time(), status=status, error=error,
                                 latency_ms=round((perf_counter() - started) * 1000, 2))
        log_server_state(self.pool.name, server, change, by="health_check", error=error, details=details)
        if self.on_probe is not None:
            self.on_probe(self.pool, server)

    async def _get(self, server) -> int:
        loop = self.proxy.loop
        conn = await self.proxy.dial(self.pool, server, self._timeouts, self.cfg.timeout)
        probe = _Probe(loop)
        request = (f"GET {self.cfg.path} HTTP/1.1\r\nHost: {server.address}\r\n"
                   f"User-Agent: gatewise-health-check\r\nConnection: close\r\n\r\n").encode()
        try:
            conn.begin(probe, b"GET", request, True)
            return await probe.waiter
        finally:
            conn.exchange = None
            conn.close()
