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
  write on the wire, which nothing can prove harmless. One case is provably harmless:
  the upstream's bytes, typically an idle-timeout 408, arrive before the request has
  left the Outbox (flow.Outbox, upstream_conn's `held`; a write is held there while
  other requests are in flight, and on a connection idle for RACE_IDLE or more):
  nothing was written, so the retry is made whatever the method.)
- The error reported is the last attempt's cause, with every attempt listed.

Two ways to wait for an attempt, one set of rules:
- The fast path (`start`): a request with nothing left to read is routed, picked and
  leased in the client's callback; on an idle pooled connection it is sent from there and
  finished from the upstream's callbacks (Exchange.on_upstream_end calls Attempt.on_end):
  no task, no future. This is the common keep-alive case.
- The forward() task: everything that has to wait (a connect, a retry, an error to
  answer). The fast path hands its attempt over, as it stands (`begun`), when it needs a
  connect or has failed; the task judges that failure like any other. An error before
  any attempt (no route, no server...) is left to the task whole.
Both paths record an attempt through the same Attempt methods, and unwind in the same
order (attempt, then in_flight, then request latency), so each rule lives in one place.
The pipelined requests queued behind a response always start in a task: they start from
the upstream's callbacks, where the connection just released could be leased again
before its parser has returned.
"""

from __future__ import annotations

import asyncio
import time
import traceback
from typing import TYPE_CHECKING, Final

from diagnostics.causes import INFO
from diagnostics.classify import classify
from proxy import headers as H
from proxy.errors import (AwaitingHead, BadRequest, ClientDisconnected, ConfigurationError,
                          ConnectionLimitReached, ConnectionTerminated, LoopDetected, NoRoute,
                          NoServerAvailable, ProxyError)
from proxy.logs import log_event, log_server_state
from proxy.router import split_target, rewrite_target

if TYPE_CHECKING:
    from proxy.exchange import Exchange
    from proxy.runtime import PoolRuntime, Proxy
    from proxy.servers import ServerState


# Every forward() task's name: asyncio's debug output, and tests, find them by it (a
# compiled coroutine has no code object to recognise). A task the fast path handed its
# failure to is named after that failure.
TASK_NAME: Final = "gatewise.forward"
HANDED_OVER: Final = TASK_NAME + " after "
# A pooled connection idle this long may be at its upstream's idle timeout (seconds long:
# Apache and Node.js 5 s, nginx 75 s); reused sooner, it is not.
RACE_IDLE: Final = 1.0
perf_counter: Final = time.perf_counter  # (as in downstream.py)


def _may_retry(exc: ProxyError, ex: Exchange, retry_non_idempotent: bool) -> bool:
    if ex.committed or not ex.replayable:
        return False
    if INFO[classify(exc)].retry_safe:  # nothing reached the upstream
        return True
    if isinstance(exc, AwaitingHead):
        return ex.head.idempotent or retry_non_idempotent
    return False


class Attempt:
    """One try of an exchange on one server: its connection and its bookkeeping, the same
    whether a task or the upstream's callbacks (the fast path) wait for it."""

    __slots__ = ("proxy", "pool", "server", "started", "trial", "conn", "failure", "race_retry")

    def __init__(self, proxy: Proxy, pool: PoolRuntime, server: ServerState, now: float, started: float) -> None:
        self.proxy = proxy
        self.pool = pool
        self.server = server
        # perf_counter: durations are measured, not derived from loop ticks (ms under uvloop)
        self.started = started
        self.trial = server.on_attempt_start()
        conn, stale = pool.idle[server].take(now)
        for c in stale:
            c.close()
        self.conn = conn  # None: a connect is needed
        self.failure: ProxyError | None = None  # how the fast path's send failed, for the task to judge
        self.race_retry = True

    def keepalive_race(self, ex: Exchange) -> bool:
        """The keep-alive race (module docstring): True, once, when the failure was a close
        or reset of a reused connection before any byte (never a timeout)."""
        conn = self.conn
        if (self.race_retry and conn is not None and conn.reused and not conn.bytes_seen and ex.replayable
                and (conn.held or ex.head.idempotent or self.pool.retry_non_idempotent)):
            self.race_retry = False
            self.proxy.recorder.keepalive_race_retries += 1
            return True
        return False

    def succeeded(self, ex: Exchange) -> None:
        """A response ended the attempt: the server's statistics, and the attempt's end
        (an attempt ends here or in end(), never both)."""
        server = self.server
        change = server.on_answered(ex.status, ex.head_at - self.started, self.trial)
        if change is not None:  # (the call is skipped in steady state: this runs per request)
            log_server_state(self.pool.name, server, change, by="trial request")

    def failed(self, ex: Exchange, exc: ProxyError) -> None:
        server = self.server
        _note_attempt(ex, server, exc, perf_counter() - self.started)
        info = INFO[classify(exc)]
        if info.blames_upstream:
            log_server_state(self.pool.name, server,
                             server.on_failure(info.token, exc.detail, self.proxy.loop.time(), self.trial),
                             by="passive", error=info.token, details=exc.detail)

    def end(self, ex: Exchange) -> None:
        """The attempt ended without a response: it failed, or it was cancelled."""
        self.server.on_attempt_end(self.trial)
        if not ex.finished:
            ex.detach()

    # -- the fast path: the exchange reports here instead of to a task -------------------
    def on_end(self, ex: Exchange) -> None:
        """The response is complete (Exchange.on_upstream_end): what the task's unwinding
        does after a success, in the same order."""
        ex.fast = None
        self.succeeded(ex)
        self.pool.in_flight -= 1
        _observe_latency(ex)

    def on_failed(self, ex: Exchange, exc: ProxyError) -> None:
        """The attempt failed (Exchange.on_upstream_failed): the task decides what follows.
        ex.fast stays set until the task runs, so a cancel() before that still ends it."""
        self.failure = exc
        ex.task = self.proxy.loop.create_task(forward(self.proxy, ex, self),
                                              name=HANDED_OVER + type(exc).__name__)


def start(proxy: Proxy, ex: Exchange) -> None:
    """Serve ex, from the callback that read its head: on the fast path when it applies
    (module docstring), else in a forward() task. (Only requests with nothing left to
    read take the fast path: a body that arrives with its head leaves in the same write,
    from the task.)"""
    if ex.body_complete and not ex.head.upgrade:
        now = proxy.loop.time()
        try:
            pool = _route(proxy, ex)
            server = pool.balancer.pick(now)
        except Exception:  # an error to answer, or a bug (500): the task meets it again and answers
            server = None
        if server is not None:
            pool.in_flight += 1
            # begun in the callback that read the head: the exchange's start is the attempt's
            at = Attempt(proxy, pool, server, now, ex.started)
            ex.fast = at
            conn = at.conn
            if conn is None:  # a connect to wait for
                ex.task = proxy.loop.create_task(forward(proxy, ex, at), name=TASK_NAME)
            else:
                # Written after this loop iteration's callbacks (flow.Outbox) when other
                # requests are in flight to this pool: the requests read in one iteration
                # then reach the upstreams together, which wake once for them. And when the
                # connection has idled long enough that the upstream may be closing it: an
                # answer that comes before the write then provably answers nothing of ours
                # (the keep-alive race, module docstring). Otherwise at once: nothing to
                # batch with, and holding it costs a loop pass (measured, compiled:
                # deferring only under concurrency beat both always and never, at c1, c50
                # and c256).
                later = pool.in_flight > 1 or now - conn.idle_since >= RACE_IDLE
                ex.send(conn, ex.head_bytes, later=later)
            return
    start_task(proxy, ex)


def start_task(proxy: Proxy, ex: Exchange) -> None:
    """Serve ex in a forward() task (the pipelined requests: see the module docstring)."""
    ex.task = proxy.loop.create_task(forward(proxy, ex), name=TASK_NAME)


def cancel(ex: Exchange) -> None:
    """Stop serving ex: the client is gone, or downstream answers the request itself (it
    sets ex.finished first). The task is cancelled and unwinds; an attempt the fast path
    still owns is ended here the same way."""
    at = ex.fast
    if at is not None:  # no task has taken it over (a task cancelled before it ran never does)
        ex.fast = None
        at.end(ex)
        at.pool.in_flight -= 1
        _cancelled(at.proxy, ex)
        _observe_latency(ex)
    task = ex.task
    if task is not None and not task.done():
        task.cancel()


def _cancelled(proxy: Proxy, ex: Exchange) -> None:
    # downstream cancels when the client goes away, or (with ex.finished set) when it has
    # already answered the request itself.
    ex.detach()
    if not ex.finished:
        ex.finished = True
        proxy.record(ex, ClientDisconnected("client closed the connection"))


def _observe_latency(ex: Exchange) -> None:
    if ex.pool is not None and ex.committed:  # answered, by the upstream or with an error
        ex.pool.request_latency.observe(perf_counter() - ex.started)


async def forward(proxy: Proxy, ex: Exchange, begun: Attempt | None = None) -> None:
    """Serve one exchange to completion: a forwarded response, or an error response.
    `begun`: the fast path's attempt, handed over (routed, counted in flight) because it
    needs a connect or failed (`begun.failure`)."""
    if begun is not None:
        ex.fast = None  # this task owns the attempt now
    loop = proxy.loop
    try:
        await _forward(proxy, ex, loop, begun)
    except asyncio.CancelledError:
        _cancelled(proxy, ex)
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
        log_event("internal_error", request_id=ex.head.request_id, error=repr(exc),
                  traceback=traceback.format_exc())
        if ex.committed:
            ex.client.abort()
        else:
            ex.client.send_error(ex, ProxyError(f"internal error: {type(exc).__name__}"))
    finally:
        _observe_latency(ex)


def _route(proxy: Proxy, ex: Exchange) -> PoolRuntime:
    """The exchange's pool (ex.pool), its upstream target and head (ex.target,
    ex.head_bytes); raises the ProxyError to answer instead."""
    head = ex.head
    if head.looped:
        raise LoopDetected(f"Via already names {proxy.cfg.diagnostics.proxy_name}")
    try:
        authority, path = split_target(head.target)
    except ValueError as exc:
        raise BadRequest(f"unsupported request target: {exc}") from None
    host = authority if authority is not None else head.host
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
    ex.head_bytes = H.build_request_head(head, target=ex.target, client_ip=ex.client.client_ip,
                                         proto=b"http", via=proxy.via)
    return pool


async def _forward(proxy: Proxy, ex: Exchange, loop: asyncio.AbstractEventLoop, begun: Attempt | None) -> None:
    if begun is None:
        pool = _route(proxy, ex)
        pool.in_flight += 1
    else:
        pool = begun.pool
    try:
        await _attempts(proxy, pool, ex, loop, begun)
    finally:
        pool.in_flight -= 1


async def _attempts(proxy: Proxy, pool: PoolRuntime, ex: Exchange, loop: asyncio.AbstractEventLoop,
                    begun: Attempt | None) -> None:
    tried: list = []
    allowed = 1 + pool.retries
    last: ProxyError | None = None
    while True:
        if begun is not None:
            at, begun = begun, None
        else:
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
            at = Attempt(proxy, pool, server, now, perf_counter())
        try:
            await _attempt(ex, at)
            return
        except ProxyError as exc:
            if len(ex.attempts) >= allowed or not _may_retry(exc, ex, pool.retry_non_idempotent):
                raise
            last = exc
            tried.append(at.server)


async def _attempt(ex: Exchange, at: Attempt) -> None:
    try:
        while True:
            if at.conn is None:
                at.conn = await at.proxy.connect(at.pool, at.server)
            try:
                if at.failure is None:
                    await ex.begin(at.conn, ex.head_bytes)
                else:  # the fast path sent on at.conn and it failed: judged here, like any failure
                    failure, at.failure = at.failure, None
                    raise failure
                break
            except ConnectionTerminated:
                if at.keepalive_race(ex):
                    ex.detach()
                    at.conn = None
                    continue
                raise
    except ProxyError as exc:
        at.failed(ex, exc)
        at.end(ex)
        raise
    except BaseException:  # cancelled
        at.end(ex)
        raise
    at.succeeded(ex)


def _note_attempt(ex: Exchange, server: ServerState, exc: ProxyError, elapsed: float) -> None:
    ex.attempts.append({"server": server.address, "error": INFO[classify(exc)].token,
                        "details": exc.detail, "elapsed_ms": round(elapsed * 1000, 2)})
