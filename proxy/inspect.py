"""What the admin listener reads: snapshots of the running proxy (diagnostics.admin's
AdminSources). The admin app is handed this object and never imports proxy (STYLE §2)."""

from __future__ import annotations

import os
import time

from diagnostics.metrics import DEFAULT_BUCKETS
from proxy.config import to_dict

STARTED_AT = time.time()


class ProxyView:
    def __init__(self, current) -> None:
        self._current = current  # () -> the Proxy serving now (a reload swaps it)

    @property
    def _proxy(self):
        return self._current()

    @property
    def token(self) -> str:
        return self._proxy.cfg.admin.token

    def upstreams(self) -> dict:
        proxy = self._proxy
        wall_offset = time.time() - proxy.loop.time()
        return {"pools": {name: pool.snapshot(wall_offset) for name, pool in proxy.pools.items()}}

    def out_reasons(self) -> dict[str, str]:
        """url -> why that server takes no traffic now (servers that do are left out)."""
        proxy = self._proxy
        now = proxy.loop.time()
        return {s.url: s.out_reason(now) for pool in proxy.pools.values() for s in pool.servers
                if not s.available(now)}

    def requests(self) -> list[dict]:
        return self._proxy.recorder.recent()

    def request(self, request_id: str) -> dict | None:
        return self._proxy.recorder.get(request_id)

    def workers(self) -> list[dict]:
        """One process serves everything (listen.workers = 1)."""
        return [{"index": 0, "pid": os.getpid(), "alive": True, "started_at": round(STARTED_AT, 3),
                 "restarts": 0, "client_connections": len(self._proxy.connections),
                 "requests_total": self.requests_total()}]

    def requests_total(self) -> int:
        """Responses this process has forwarded (a worker reports it to the supervisor)."""
        return sum(sum(s.responses_by_class) for pool in self._proxy.pools.values() for s in pool.servers)

    def config(self) -> dict:
        return to_dict(self._proxy.cfg, redact=True)

    def metrics(self) -> dict:
        proxy = self._proxy
        return {"buckets": list(DEFAULT_BUCKETS), "client_connections": len(proxy.connections),
                "retries_total": proxy.recorder.retries_total,
                "keepalive_race_retries_total": proxy.recorder.keepalive_race_retries,
                "generated_errors": dict(proxy.generated_errors),
                "pools": {name: pool.metrics() for name, pool in proxy.pools.items()}}

    def ready(self) -> bool:
        """At least one route leads to a pool with a server that can take traffic."""
        proxy = self._proxy
        if proxy.draining:  # stopping: tell load balancers to go elsewhere first
            return False
        now = proxy.loop.time()
        return any(proxy.pools[route.pool].any_available(now) for route in proxy.cfg.routes)

    def doctor(self) -> dict | None:
        from diagnostics.doctor import run_doctor  # imported on use: only /debug/doctor needs it

        # a coroutine (the admin app awaits it), with the proxy's own name lookup
        return run_doctor(self._proxy.cfg, resolver=self._proxy.resolver.lookup)
