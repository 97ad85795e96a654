"""What every connection of one running proxy shares, built once from the frozen config:
the router, the pools (server states, balancer, idle connections), the recorder, and the
error responses gatewise writes itself. A reload builds a new Proxy; connections keep the
one they started with (server.Server.reload). Compiled with the hot path
(proxy/compiled.py): every request reads it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from diagnostics import error_body, proxy_status
from diagnostics.causes import INFO, Cause
from diagnostics.classify import classify
from diagnostics.hints import HintContext, hint_for
from diagnostics.recorder import Recorder
from proxy.balancer import make_balancer
from proxy.codec import resolve_parser
from proxy.config import PoolConfig, ProxyConfig
from proxy.errors import ConnectRefused, DestinationUnroutable, ProxyError
from proxy.flow import Outbox
from proxy.headers import date_field, new_request_id, status_line
from proxy.logs import log_event
from proxy.pool import IdlePool
from proxy.resolve import Resolver
from proxy.router import Route, Router
from proxy.servers import HealthPolicy, ServerState
from proxy.stats import Histogram
from proxy.tls import client_context
from proxy.upstream_conn import UpstreamConnection, connect

if TYPE_CHECKING:
    from proxy.downstream import DownstreamProtocol


class PoolRuntime:
    __slots__ = ("name", "cfg", "servers", "balancer", "retries", "retry_non_idempotent", "idle",
                 "request_latency", "tls", "max_connections", "in_flight")

    def __init__(self, cfg: PoolConfig, make_server: Callable[..., ServerState] | None = None) -> None:
        self.name = cfg.name
        self.cfg = cfg
        passive = cfg.passive
        policy = HealthPolicy(active=cfg.health is not None,
                              rise=cfg.health.rise if cfg.health else 2,
                              fall=cfg.health.fall if cfg.health else 3,
                              max_fails=passive.max_fails if passive else 0,
                              fail_window=passive.fail_window if passive else 10.0,
                              eject_for=passive.eject_for if passive else 30.0)
        if make_server is None:  # one process: the states live here
            self.servers = [ServerState(s.url, s.host, s.port, s.weight, s.backup, policy) for s in cfg.servers]
        else:  # a worker: the supervisor owns health (proxy/cluster.py)
            self.servers = [make_server(cfg.name, i, s.url, s.host, s.port, s.weight, s.backup, policy=policy)
                            for i, s in enumerate(cfg.servers)]
        self.balancer = make_balancer(cfg.balance, self.servers)
        self.retries = cfg.retries
        self.retry_non_idempotent = cfg.retry_non_idempotent
        self.max_connections = cfg.max_connections
        self.in_flight = 0  # requests of this pool holding an upstream connection now
        self.idle: dict[ServerState, IdlePool[UpstreamConnection]] = {s: IdlePool() for s in self.servers}
        self.request_latency = Histogram()  # seconds, client view, for /metrics
        # https:// servers: (context, name to send as SNI and verify), built once
        self.tls = {state: (client_context(verify=c.tls_verify, ca_file=c.ca_file), c.sni or c.host)
                    for state, c in zip(self.servers, cfg.servers) if c.scheme == "https"}

    def unavailable_reasons(self, now: float) -> str:
        return "; ".join(s.out_reason(now) for s in self.servers)

    def any_available(self, now: float) -> bool:
        return any(s.available(now) for s in self.servers)

    def snapshot(self, wall_offset: float) -> dict:
        return {"balance": self.cfg.balance,
                "servers": [s.snapshot(len(self.idle[s]), wall_offset) for s in self.servers]}

    def metrics(self) -> dict:
        return {"request_latency": self.request_latency.snapshot(),
                "servers": [s.metrics() for s in self.servers]}


class Proxy:
    """Shared state of one running proxy."""

    def __init__(self, cfg: ProxyConfig, loop: asyncio.AbstractEventLoop, lookup=None,
                 make_server=None) -> None:
        self.cfg = cfg
        self.loop = loop
        # Read per request by every client connection: copied out of the (frozen) config
        # into typed attributes, one read each instead of a walk through two dataclasses.
        self.client_idle = cfg.timeouts.client_idle
        self.client_header = cfg.timeouts.client_header
        self.max_request_body = cfg.limits.max_request_body_bytes
        self.resolver = Resolver(loop, lookup)
        self.outbox = Outbox(loop)  # writes held to the end of a loop iteration (flow.Outbox)
        self.parser_kind = resolve_parser(cfg.listen.parser)
        self.router = Router([Route(r.host, r.path_prefix, r.pool, r.strip_prefix) for r in cfg.routes])
        self.pools = {name: PoolRuntime(p, make_server) for name, p in cfg.pools.items()}
        self.recorder = Recorder(cfg.diagnostics.recent_requests)
        name = cfg.diagnostics.proxy_name
        self.proxy_name = name
        self.proxy_name_b = name.lower().encode()
        self.via = b"1.1 " + name.encode()
        self.minimal = cfg.diagnostics.detail == "minimal"
        # for hints, built once: a failure costs a lookup, not a dataclass walk
        self._timeouts = dataclasses.asdict(cfg.timeouts)
        self._limits = dataclasses.asdict(cfg.limits)
        self.connections: set[DownstreamProtocol] = set()
        self.generated_errors: dict[str, int] = {}  # responses gatewise made, by RFC 9209 token
        self.draining = False
        self.all_closed = asyncio.Event()  # set when draining and the last client is gone

    # -- upstream connections ------------------------------------------------------------
    async def connect(self, pool: PoolRuntime, server: ServerState) -> UpstreamConnection:
        """A new connection for live traffic, owned by the server's idle pool."""
        cfg = self.cfg
        conn = await self.dial(pool, server, cfg.timeouts, cfg.timeouts.connect)
        conn.idle_pool = pool.idle[server]
        return conn

    async def dial(self, pool: PoolRuntime, server: ServerState, timeouts, timeout: float) -> UpstreamConnection:
        """Resolve (cached), pick the next endpoint, connect (+TLS). Health checks use
        this too, so a probe fails with the cause a request would."""
        loop = self.loop
        addresses = await self.resolver.addresses(server.host, server.port, timeout, upstream=server.address)
        first = server.next_endpoint(addresses)
        tls, name = pool.tls.get(server, (None, None))
        max_head = self.cfg.limits.max_response_header_bytes

        def factory() -> UpstreamConnection:
            return UpstreamConnection(loop, server, self.parser_kind, max_head, timeouts, self.outbox)

        # Several addresses: a fast refusal on one moves on to the next within the same
        # attempt (the classic "localhost" = ::1 + 127.0.0.1 with a service on one only),
        # so one dead address never ejects the whole server. A timeout does not move on:
        # it has already spent the attempt's budget.
        start = addresses.index(first)
        last: ProxyError | None = None
        for ip in addresses[start:] + addresses[:start]:
            try:
                return await connect(loop, ip, server.port, timeout, factory, address=server.address,
                                     tls=tls, server_name=name)
            except (ConnectRefused, DestinationUnroutable) as exc:
                last = exc
        assert last is not None  # (addresses is never empty: the resolver raises instead)
        raise last

    def close_idle(self) -> None:
        """Close every pooled upstream connection (stop, reload)."""
        for pool in self.pools.values():
            for idle in pool.idle.values():
                for conn in idle.drain():
                    conn.close()

    # -- errors ----------------------------------------------------------------------------
    def received_status_member(self, next_hop: str, status: int) -> bytes:
        return proxy_status.render(self.proxy_name, next_hop=None if self.minimal else next_hop,
                                   received_status=status)

    def error_response(self, ex, exc: ProxyError, *, keep_alive: bool) -> bytes:
        """The whole HTTP/1.1 response gatewise sends instead of the upstream's."""
        cause = classify(exc)
        info = INFO[cause]
        request_id = ex.head.request_id if ex is not None else new_request_id()  # a request with no parsed head
        next_hop = exc.upstream
        details = exc.detail or info.summary
        attempts = ex.attempts if ex is not None else []
        if len(attempts) > 1:
            details = f"{details}; {len(attempts)} attempts"
        member = proxy_status.render_cause(self.proxy_name, cause, next_hop=next_hop, details=details,
                                           minimal=self.minimal, extra=exc.params)
        entry = self.record(ex, exc, status=info.status, details=details, request_id=request_id)
        accept = ex.head.accept if ex is not None else None
        # The hint is for people: in the body and /debug, never in Proxy-Status.
        ctype, body = error_body.render_body(
            error_body.choose_format(accept), status=info.status, error=info.token,
            request_id=request_id, details=details, hint=entry["hint"], attempts=attempts,
            minimal=self.minimal)
        body_out = b"" if ex is not None and ex.head.method == b"HEAD" else body
        if not keep_alive:
            connection = b"Connection: close\r\n"
        elif ex is not None and ex.head.version == b"1.0":
            connection = b"Connection: keep-alive\r\n"
        else:
            connection = b""
        head = b"".join((status_line(info.status), date_field(),
                         b"Content-Type: ", ctype, b"\r\n",
                         b"Content-Length: ", str(len(body)).encode(), b"\r\n",
                         b"Cache-Control: no-store\r\n",
                         b"Proxy-Status: ", member, b"\r\n",
                         b"X-Request-Id: ", request_id.encode(), b"\r\n",
                         connection, b"\r\n"))
        self.generated_errors[info.token] = self.generated_errors.get(info.token, 0) + 1
        return head + body_out

    def record(self, ex, exc: ProxyError, *, status: int | None = None, details: str | None = None,
               request_id: str | None = None) -> dict:
        cause = classify(exc)
        info = INFO[cause]
        if request_id is None:
            request_id = ex.head.request_id if ex is not None else "-"
        method = ex.head.method.decode("latin-1") if ex is not None else "-"
        path = ex.head.target[:512].decode("latin-1") if ex is not None else "-"
        details = details or exc.detail or info.summary
        entry = self.recorder.record_failure(
            request_id=request_id, method=method, path=path,
            status=info.status if status is None else status, error=info.token, details=details,
            hint=self._hint(cause, exc, ex, details, path),
            attempts=list(ex.attempts) if ex is not None else [])
        log_event("request_failed", **entry)
        return entry

    def _hint(self, cause: Cause, exc: ProxyError, ex, details: str, path: str) -> str | None:
        """What a person should check next, written with the actual values."""
        server = None
        if exc.upstream is not None and ex is not None and ex.pool is not None:
            server = next((s for s in ex.pool.servers if s.address == exc.upstream), None)
        # p99 sorts the latency window: only the hint that quotes it pays for it
        p99 = (server.latency.percentiles()["p99"]
               if server and cause in (Cause.RESPONSE_TIMEOUT, Cause.CLIENT_DISCONNECTED) else None)
        ctx = HintContext(server=exc.upstream, host=server.host if server else None,
                          port=server.port if server else None, at=time.time(),
                          timeouts=self._timeouts, limits=self._limits, p99_ms=p99, details=details,
                          pool=ex.pool.name if ex is not None and ex.pool is not None else None,
                          path=path if path != "-" else None, proxy_name=self.proxy_name,
                          reasons=details if cause is Cause.NO_SERVER_AVAILABLE else None,
                          scheme="https" if server is not None and server in ex.pool.tls else "http",
                          variant=exc.hint_variant)
        return hint_for(cause.value, ctx)
