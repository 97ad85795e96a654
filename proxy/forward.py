"""The attempt loop: route -> pick -> lease -> send -> stream, with retries.

Retry rules (nginx proxy_next_upstream, Envoy retry policies, RFC 9110 §9.2.2):
- Up to `retries` extra attempts, each on a server not tried yet when one exists.
- Never once the response head went to the client.
- A connect-phase failure (BeforeSend) is always retried: nothing was sent.
- Any later failure is retried only for idempotent methods (or every method with
  `retry_non_idempotent`), and only while the request body is still replayable.
- The keep-alive race: a request whose *reused* pooled connection is closed or reset
  before any response byte arrives (never a timeout) is retried once on a fresh
  connection to the same server when it is idempotent (or `retry_non_idempotent` is
  set). That retry does not use up `retries`, is counted in the recorder, and never
  reaches the client as a 502. (A pooled connection already seen closed is never
  leased, so a non-idempotent request only meets the race when the close crosses our
  write on the wire, which nothing can prove harmless.)
- The error reported is the last attempt's cause, with every attempt listed.
"""

from __future__ import annotations

import asyncio
import traceback
from time import perf_counter

from diagnostics.causes import INFO
from diagnostics.classify import classify
from proxy import headers as H
from proxy.errors import (AwaitingHead, BadRequest, ClientDisconnected, ConfigurationError,
                          ConnectionLimitReached, ConnectionTerminated, LoopDetected, NoRoute,
                          NoServerAvailable, ProxyError)
from proxy.logs import log_event
from proxy.router import split_target, rewrite_target


def _may_retry(exc: ProxyError, ex, retry_non_idempotent: bool) -> bool:
    if ex.committed or not ex.replayable:
        return False
    if INFO[classify(exc)].retry_safe:  # nothing reached the upstream
        return True
    if isinstance(exc, AwaitingHead):
        return ex.info.idempotent or retry_non_idempotent
    return False


async def forward(proxy, ex) -> None:
    """Serve one exchange to completion: a forwarded response, or an error response."""
    loop = proxy.loop
    try:
        await _forward(proxy, ex, loop)
    except asyncio.CancelledError:
        # downstream cancels us when the client goes away, or (with ex.finished set)
        # when it has already answered the request itself.
        ex.detach()
        if not ex.finished:
            ex.finished = True
            proxy.record(ex, ClientDisconnected("client closed the connection"))
    except ProxyError as exc:
        ex.detach()
        if ex.finished:  # downstream already answered (a rejected body, for instance)
            return
        if ex.committed:
            ex.client.abort()  # never a clean end that hides the cut
            proxy.record(ex, exc)
        else:
            ex.client.send_error(ex, exc)
    except Exception as exc:  # a bug in gatewise: answer 500 proxy_internal_error
        ex.detach()
        log_event("internal_error", request_id=ex.info.request_id, error=repr(exc),
                  traceback=traceback.format_exc())
        if ex.committed:
            ex.client.abort()
        else:
            ex.client.send_error(ex, ProxyError(f"internal error: {type(exc).__name__}"))
    finally:
        if ex.pool is not None and ex.committed:  # answered, by the upstream or with an error
            ex.pool.request_latency.observe(perf_counter() - ex.started)


async def _forward(proxy, ex, loop) -> None:
    info = ex.info
    if info.looped:
        raise LoopDetected(f"Via already names {proxy.cfg.diagnostics.proxy_name}")
    try:
        authority, path = split_target(ex.head.target)
    except ValueError as exc:
        raise BadRequest(f"unsupported request target: {exc}") from None
    host = authority if authority is not None else info.host
    route = proxy.router.match(host, path)
    if route is None:
        raise NoRoute(f"no route for host {(host or b'').decode('latin-1')!r} "
                      f"path {path[:200].decode('latin-1')!r}")
    pool = proxy.pools[route.pool]
    ex.pool = pool
    if not pool.servers:
        raise ConfigurationError(f"pool {pool.name!r} has no servers (servers = [] in the config)")
    limit = pool.max_connections
    if limit and pool.in_flight >= limit:
        raise ConnectionLimitReached(f"{pool.in_flight} requests in flight to pool {pool.name!r} "
                                     f"(pools.{pool.name}.max_connections = {limit})")
    ex.target = rewrite_target(route, path)
    head_bytes = H.build_request_head(ex.head, info, target=ex.target, client_ip=ex.client.client_ip,
                                      proto=b"http", via=proxy.via)
    pool.in_flight += 1
    try:
        await _attempts(proxy, pool, ex, head_bytes, loop)
    finally:
        pool.in_flight -= 1


async def _attempts(proxy, pool, ex, head_bytes: bytes, loop) -> None:
    tried: list = []
    allowed = 1 + pool.retries
    last: ProxyError | None = None
    while True:
        now = loop.time()
        server = pool.balancer.pick(now, tried)
        if server is None and tried:
            server = pool.balancer.pick(now)  # every server tried: retry on one again
        if server is None:
            if last is not None:  # the last attempt's cause, not "nothing available"
                raise last
            raise NoServerAvailable(pool.unavailable_reasons(now) or f"pool {pool.name!r} has no servers")
        if last is not None:
            proxy.recorder.retries_total += 1
        try:
            await _attempt(proxy, pool, server, ex, head_bytes, loop)
            return
        except ProxyError as exc:
            if len(ex.attempts) >= allowed or not _may_retry(exc, ex, pool.retry_non_idempotent):
                raise
            last = exc
            tried.append(server)


async def _attempt(proxy, pool, server, ex, head_bytes: bytes, loop) -> None:
    started = perf_counter()  # durations are measured, not derived from loop ticks (ms under uvloop)
    trial = server.on_attempt_start()
    conn = proxy.lease(pool, server, loop.time())
    race_retry = True
    try:
        while True:
            if conn is None:
                conn = await proxy.connect(pool, server)
            try:
                await ex.begin(conn, head_bytes)
                _log_change(pool, server, server.on_success(ex.status, ex.head_at - started, trial), "trial request")
                return
            except ConnectionTerminated:
                # Only a close/reset before any byte is the race; a timeout is not.
                if (race_retry and conn.reused and not conn.bytes_seen and ex.replayable
                        and (ex.info.idempotent or pool.retry_non_idempotent)):
                    race_retry = False
                    proxy.recorder.keepalive_race_retries += 1
                    ex.detach()
                    conn = None
                    continue
                raise
    except ProxyError as exc:
        _note_attempt(ex, server, exc, perf_counter() - started)
        info = INFO[classify(exc)]
        if info.blames_upstream:
            _log_change(pool, server, server.on_failure(info.token, exc.detail, loop.time(), trial),
                        "passive", error=info.token, details=exc.detail)
        raise
    finally:
        server.on_attempt_end(trial)
        if not ex.finished:
            ex.detach()


def _log_change(pool, server, change, by: str, **fields) -> None:
    """One log line per state transition (servers.py returns None in steady state)."""
    if change is not None:
        log_event("server_state", pool=pool.name, server=server.address, old=str(change[0]),
                  new=str(change[1]), by=by, reason=server.eject_reason or None, **fields)


def _note_attempt(ex, server, exc: ProxyError, elapsed: float) -> None:
    ex.attempts.append({"server": server.address, "error": INFO[classify(exc)].token,
                        "details": exc.detail, "elapsed_ms": round(elapsed * 1000, 2)})
