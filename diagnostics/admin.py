"""The admin listener: /debug/*, /metrics, /healthz, /readyz (SPEC "Admin endpoints").

aiohttp serves it; it is not the hot path. The proxy hands in an `AdminSources`: snapshot
callables, read on every admin request, so nothing here holds proxy state or imports
`proxy` (STYLE §2). Modelled on Caddy's admin API: GET-only JSON snapshots.

Rules:
- GET and HEAD only; anything else is 405 with `Allow: GET, HEAD`.
- `sources.token` non-empty: every admin request, /healthz and /metrics included, needs
  `Authorization: Bearer <token>` (RFC 6750 §2.1), compared in constant time; else 401 with
  `WWW-Authenticate: Bearer` (§3). The token is read per request, so a config reload that
  changes it takes effect at once. Authentication comes before routing and method checks,
  so an unauthenticated caller learns nothing about which paths exist.
- Every JSON body goes through orjson; errors are JSON too ({"error": ..., "details": ...}).
- A source that raises gives a 500 JSON answer and a log line, never a dropped connection.
- Responses are `Cache-Control: no-store`: they are snapshots of now.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import ipaddress
import logging
import time
from dataclasses import dataclass
from typing import Protocol

import orjson
from aiohttp import web

from diagnostics.debug_page import render_debug_page
from diagnostics.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from diagnostics.metrics import render_metrics

log = logging.getLogger("gatewise.admin")

JSON_TYPE = "application/json"  # RFC 8259 §11: no charset parameter
HTML_TYPE = "text/html; charset=utf-8"
_ALLOWED = ("GET", "HEAD")
ENDPOINTS = ("/debug", "/debug/upstreams", "/debug/requests", "/debug/requests/{request_id}",
             "/debug/config", "/debug/doctor", "/debug/workers", "/metrics", "/healthz", "/readyz")


class AdminSources(Protocol):
    token: str  # "" = no authentication

    def upstreams(self) -> dict: ...
    def requests(self) -> list[dict]: ...
    def request(self, request_id: str) -> dict | None: ...
    def config(self) -> dict: ...
    def metrics(self) -> dict: ...
    def ready(self) -> bool: ...
    def doctor(self) -> dict | None: ...  # may also return an awaitable of that
    def out_reasons(self) -> dict[str, str]: ...  # server url -> why it takes no traffic
    def workers(self) -> list[dict]: ...  # the processes serving traffic
    # upstreams, requests, request, metrics, workers and doctor may return an awaitable
    # (with listen.workers > 1 they ask every worker)


async def _value(result):
    return await result if inspect.isawaitable(result) else result


# ---- responses -----------------------------------------------------------------------------

def _dumps(data: object) -> bytes:
    # These documents are read by people with curl as often as by scripts: indent them.
    # default=str: a stray Path or Decimal in a snapshot must not turn /debug into a 500.
    return orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS
                        | orjson.OPT_APPEND_NEWLINE, default=str)


def _json(data: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=_dumps(data), status=status,
                        headers={"Content-Type": JSON_TYPE, "Cache-Control": "no-store", **(headers or {})})


def _text(body: str, content_type: str) -> web.Response:
    return web.Response(body=body.encode("utf-8", "replace"),
                        headers={"Content-Type": content_type, "Cache-Control": "no-store"})


# ---- authentication ------------------------------------------------------------------------

def _authorized(header: str | None, token: str) -> bool:
    if not header:
        return False
    scheme, _, credentials = header.strip().partition(" ")
    # Evaluate both sides unconditionally: compare_digest is constant-time for equal
    # lengths and leaks only the length otherwise, which the token owner chooses.
    scheme_ok = scheme.lower() == "bearer"
    token_ok = hmac.compare_digest(credentials.strip().encode("utf-8", "surrogatepass"),
                                   token.encode("utf-8", "surrogatepass"))
    return scheme_ok and token_ok


def _unauthorized(header: str | None) -> web.Response:
    challenge = 'Bearer realm="gatewise admin"'
    if header:
        challenge += ', error="invalid_token"'  # RFC 6750 §3.1
    return _json({"error": "unauthorized",
                  "details": "this admin listener needs 'Authorization: Bearer <token>' ([admin] token)"},
                 status=401, headers={"WWW-Authenticate": challenge})


def admin_warning(host: str, token: str) -> str | None:
    """A loud warning when the admin listener is reachable beyond this machine without a
    token, else None. Hostnames other than localhost count as not loopback: we do not
    resolve here, and a name is exactly what may point somewhere public."""
    if token:
        return None
    bare = host.strip().strip("[]")
    if bare.lower().rstrip(".") == "localhost":
        return None
    try:
        ip = ipaddress.ip_address(bare.split("%", 1)[0])
    except ValueError:
        ip = None
    if ip is not None:
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ip.is_loopback:
            return None
    shown = bare or "all interfaces"
    return (f"WARNING: the admin listener on {shown} is not loopback-only and [admin] token is "
            f"empty: anyone who can reach it can read /debug/config, recent request paths, "
            f"upstream addresses and /metrics. Set [admin] token, or bind [admin] address to "
            f"127.0.0.1.")


# ---- the app -------------------------------------------------------------------------------

_SOURCES = web.AppKey("sources", object)


def make_app(sources: AdminSources) -> web.Application:

    @web.middleware
    async def guard(request: web.Request, handler) -> web.StreamResponse:
        token = sources.token
        if token:
            header = request.headers.get("Authorization")
            if not _authorized(header, token):
                return _unauthorized(header)
        if request.method not in _ALLOWED:
            return _json({"error": "method not allowed",
                          "details": f"the admin endpoints are read-only; {request.method} is not allowed"},
                         status=405, headers={"Allow": ", ".join(_ALLOWED)})
        try:
            return await handler(request)
        except web.HTTPNotFound:
            return _json({"error": "not found", "path": request.path, "endpoints": list(ENDPOINTS)},
                         status=404)
        except web.HTTPException:
            raise
        except Exception as exc:  # a snapshot callable failed: say so, keep serving
            log.exception("admin %s %s failed", request.method, request.path)
            return _json({"error": "proxy_internal_error",
                          "details": f"{type(exc).__name__}: {exc}"}, status=500)

    async def upstreams(_: web.Request) -> web.Response:
        return _json(await _value(sources.upstreams()))

    async def requests(_: web.Request) -> web.Response:
        return _json(await _value(sources.requests()))

    async def workers(_: web.Request) -> web.Response:
        return _json({"workers": await _value(sources.workers())})

    async def one_request(request: web.Request) -> web.Response:
        request_id = request.match_info["request_id"]
        entry = await _value(sources.request(request_id))
        if entry is None:
            return _json({"error": "unknown request id", "request_id": request_id,
                          "details": "only the most recent failed requests are kept "
                                     "([diagnostics] recent_requests); see /debug/requests"},
                         status=404)
        return _json(entry)

    async def config(_: web.Request) -> web.Response:
        return _json(sources.config())

    async def doctor(_: web.Request) -> web.Response:
        report = await _value(sources.doctor())
        if report is None:
            return _json({"error": "doctor arrives in a later release"}, status=501)
        return _json(report)

    async def page(_: web.Request) -> web.Response:
        # The page also says why a server is out; /debug/upstreams keeps SPEC's exact shape.
        # concurrently: a multi-worker source answers all three from one round of snapshots
        upstreams, recent, workers = await asyncio.gather(_value(sources.upstreams()), _value(sources.requests()),
                                                          _value(sources.workers()))
        reasons = sources.out_reasons()
        for pool in upstreams.get("pools", {}).values():
            for server in pool.get("servers", []):
                if server.get("url") in reasons:
                    server["reason"] = reasons[server["url"]]
        return _text(render_debug_page(upstreams, recent, time.time(), workers), HTML_TYPE)

    async def metrics(_: web.Request) -> web.Response:
        return _text(render_metrics(await _value(sources.metrics())), METRICS_CONTENT_TYPE)

    async def healthz(_: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        ready = bool(sources.ready())
        return _json({"ready": ready}, status=200 if ready else 503)

    app = web.Application(middlewares=[guard])
    app[_SOURCES] = sources
    routes = {"/debug/upstreams": upstreams, "/debug/requests": requests,
              "/debug/requests/{request_id}": one_request, "/debug/config": config,
              "/debug/doctor": doctor, "/debug/workers": workers, "/debug": page, "/debug/": page, "/metrics": metrics,
              "/healthz": healthz, "/readyz": readyz}
    for path, handler in routes.items():
        app.router.add_get(path, handler)  # add_get also answers HEAD
    return app


# ---- the listener --------------------------------------------------------------------------

@dataclass(slots=True)
class AdminServer:
    host: str
    port: int
    _runner: web.AppRunner

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    async def close(self) -> None:
        await self._runner.cleanup()


async def start_admin(sources: AdminSources, host: str, port: int) -> AdminServer:
    """Serve the admin app on host:port (port 0: any free port) in the running loop.

    `.port` is the real bound port. A name that resolves to several addresses binds each;
    with port 0 they may get different ports, and `.port` is the first one's.
    """
    host = host.strip("[]")
    # Admin requests are tiny snapshots: do not wait a minute for one on shutdown.
    runner = web.AppRunner(make_app(sources), access_log=None, handle_signals=False,
                           shutdown_timeout=2.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host or None, port)
        await site.start()
        bound = runner.addresses
        if not bound:
            raise OSError(f"admin listener bound no socket for {host}:{port}")
    except BaseException:
        await runner.cleanup()
        raise
    return AdminServer(host=host, port=bound[0][1], _runner=runner)
