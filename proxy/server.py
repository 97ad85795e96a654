"""A listening proxy and its lifecycle.

`Server` runs one `Proxy` (proxy/runtime.py: what every connection shares) and owns the
listener, reloads and the graceful drain (uvicorn's shutdown, STYLE §2): stop
accepting, let in-flight responses finish and close idle connections, and abort what is
left when `timeouts.shutdown_grace` runs out.
"""

from __future__ import annotations

import asyncio

from diagnostics.admin import admin_warning, start_admin
from proxy.config import ProxyConfig
from proxy.downstream import DownstreamProtocol
from proxy.health import HealthChecker
from proxy.inspect import ProxyView
from proxy.logs import log_event
from proxy.runtime import Proxy


class Server:
    """A listening proxy. `await start()`, then `await stop()`."""

    def __init__(self, cfg: ProxyConfig, *, lookup=None) -> None:
        self.cfg = cfg
        self._lookup = lookup  # injectable name lookup (tests): async (host, port) -> [ip, ...]
        self.proxy: Proxy | None = None
        self.admin = None  # diagnostics.admin.AdminServer
        self._checkers: list[HealthChecker] = []
        self._retired: list[Proxy] = []  # runtimes replaced by a reload, still finishing
        self._server: asyncio.base_events.Server | None = None
        self.host = cfg.listen.host
        self.port = cfg.listen.port
        self.stopped = asyncio.Event()

    async def start(self) -> "Server":
        self.proxy = self._new_proxy(self.cfg, asyncio.get_running_loop())
        await self._listen(self.cfg.listen.port)
        self._start_checks()
        await self._start_admin()
        return self

    def _new_proxy(self, cfg: ProxyConfig, loop) -> Proxy:
        return Proxy(cfg, loop, self._lookup)

    async def _listen(self, port: int, *, reuse_port: bool = False) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: DownstreamProtocol(self.proxy),
                                                self.cfg.listen.host, port, backlog=1024,
                                                reuse_address=True, reuse_port=reuse_port or None)
        sock = self._server.sockets[0]
        self.host, self.port = sock.getsockname()[:2]

    def _start_checks(self) -> None:
        self._checkers = [HealthChecker(self.proxy, pool, pool.cfg.health)
                          for pool in self.proxy.pools.values() if pool.cfg.health is not None]
        for checker in self._checkers:
            checker.start()

    async def _start_admin(self) -> None:
        admin = self.cfg.admin
        try:
            self.admin = await start_admin(ProxyView(lambda: self.proxy), admin.host, admin.port)
        except OSError:
            await self.stop(grace=0)
            raise
        if warning := admin_warning(admin.host, admin.token):
            log_event("warning", message=warning)

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def listening_fields(self) -> dict:
        return {"address": self.address, "admin": self.admin.address, "parser": self.proxy.parser_kind}

    def status_fields(self) -> dict:
        return {"connections": len(self.proxy.connections)}

    async def reload(self, cfg: ProxyConfig) -> list[str]:
        """Serve a new config without dropping a connection (SIGHUP; nginx's reload).

        New connections get the new routes, pools and limits at once. Established ones
        finish the request in flight under the config they started with, then close, so
        their clients reconnect to the new one. The failure ring is kept; server states
        and counters start afresh, as with nginx's new workers. Returns what the reload
        could not change (the listen and admin addresses need a restart)."""
        notes = []
        if cfg.listen.address != self.cfg.listen.address:
            notes.append(f"listen.address stays {self.address} until a restart")
        if cfg.admin.address != self.cfg.admin.address:
            notes.append(f"admin.address stays {self.admin.address if self.admin else '-'} until a restart")
        old = self.proxy
        new = self._new_proxy(cfg, old.loop)
        new.recorder = old.recorder
        new.recorder.size = cfg.diagnostics.recent_requests
        for checker in self._checkers:
            await checker.stop()
        self.proxy, self.cfg = new, cfg
        self._start_checks()
        self._retired = [p for p in self._retired if p.connections] + [old]
        old.draining = True  # what the old runtime still releases is closed, not pooled
        for conn in list(old.connections):
            conn.drain()
        old.close_idle()
        return notes

    async def stop(self, grace: float | None = None) -> None:
        """Graceful drain: stop accepting, finish in-flight responses, then abort the rest."""
        proxy = self.proxy
        if proxy is None or self._server is None:
            return
        grace = self.cfg.timeouts.shutdown_grace if grace is None else grace
        proxy.draining = True
        self._server.close()
        for conn in list(proxy.connections):
            conn.drain()
        if proxy.connections:
            try:
                await asyncio.wait_for(proxy.all_closed.wait(), grace)
            except TimeoutError:
                log_event("drain_timeout", aborted=len(proxy.connections))
        for conn in list(proxy.connections):
            conn.abort()
        proxy.close_idle()
        await self._server.wait_closed()
        for old in self._retired:
            for conn in list(old.connections):
                conn.abort()
        for checker in self._checkers:
            await checker.stop()
        proxy.resolver.cancel()
        if self.admin is not None:
            await self.admin.close()
            self.admin = None
        self.stopped.set()
