"""`gatewise demo`: a proxy and its upstreams in one process, to try things.

Everything runs on one uvloop: demo upstreams from diagnostics.faults (two healthy servers
weighted 3:1 and a flaky one in pool "app", a refused port as the only server of pool
"broken", reached by the route "/broken"), and the proxy itself (Server). The config is
built as a dict, validated with parse_config, and also written as TOML to a temporary
file so `gatewise doctor -c THATFILE` can be run against the same setup.

With the default --listen (port 8080) the upstreams take the fixed ports 9001-9004, so
the printed lines are the same every time; with any other listen port they take free
ports (port 0), which is what tests use. Runs until SIGINT/SIGTERM/SIGHUP, then stops
the proxy and every upstream, removes the temporary config, prints "stopped", exit 0.
A busy port exits 1 with a message naming it and the flag that chooses another.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

from proxy import compiled
from proxy.config import ConfigError, parse_address, parse_config, to_toml

DEFAULT_LISTEN_PORT = 8080
FIXED_UPSTREAM_PORTS = (9001, 9002, 9003, 9004)   # with the default listen port only
FLAKY = "flaky:0.3"
CONFIG_NAME = "gatewise-demo.toml"


class PortBusy(Exception):
    """A port the demo needs is taken; `.port` and `.hint` say which and what to do."""

    def __init__(self, port: int, what: str, hint: str) -> None:
        super().__init__(f"port {port} ({what}) is already in use")
        self.port, self.what, self.hint = port, what, hint


@dataclass
class _Upstream:
    role: str                 # shown to the user
    mode: str                 # FaultServer mode
    pool: str
    weight: int
    port: int                 # requested (0 = any free port)
    server: Any = None        # the started FaultServer

    @property
    def address(self) -> str:
        return self.server.address


def _show(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _reachable(host: str) -> str:
    """A host a local curl can use for an address we listen on (wildcards via loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


# -- TOML ---------------------------------------------------------------------------------

# -- the demo setup -----------------------------------------------------------------------

def _upstreams(fixed: bool) -> list[_Upstream]:
    ports = FIXED_UPSTREAM_PORTS if fixed else (0, 0, 0, 0)
    return [
        _Upstream("healthy, weight 3", "ok", "app", 3, ports[0]),
        _Upstream("healthy, weight 1", "ok", "app", 1, ports[1]),
        _Upstream("flaky: resets 30% of requests, weight 1", FLAKY, "app", 1, ports[2]),
        _Upstream("down: nothing listens (connection refused)", "refuse", "broken", 1, ports[3]),
    ]


def _config_data(listen: str, admin: str, ups: list[_Upstream]) -> dict[str, Any]:
    def servers(pool: str) -> list[dict]:
        return [{"url": u.server.url, "weight": u.weight} for u in ups if u.pool == pool]

    return {
        "listen": {"address": listen},
        "admin": {"address": admin},
        "pools": {
            # Active checks make the flaky server's trouble visible in /debug/upstreams;
            # passive ejection keeps its defaults.
            "app": {"health": {"path": "/health", "interval": 2.0, "fall": 3},
                    "servers": servers("app")},
            # Always a 502 connection_refused: no retries on the one dead server, and no
            # passive ejection (which would turn the next requests into 503s).
            "broken": {"retries": 0, "passive": {"max_fails": 0}, "servers": servers("broken")},
        },
        "routes": [{"path_prefix": "/broken", "pool": "broken"},
                   {"path_prefix": "/", "pool": "app"}],
    }


def _check_free(host: str, port: int, what: str, hint: str) -> None:
    """For the refused upstream: a fixed port someone listens on would not be 'down'."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # only a listener makes bind fail
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortBusy(port, what, hint) from None
            raise


def _command_prefix() -> str:
    """How this process was started, to print a doctor line that works as-is."""
    argv0 = sys.argv[0] if sys.argv else ""
    if os.path.basename(argv0) == "gatewise":
        return argv0
    return f"{sys.executable} -m proxy"


def _banner(server, ups: list[_Upstream], config_path: str) -> str:
    proxy_addr = _show(_reachable(server.host), server.port)
    admin_addr = _show(_reachable(server.admin.host), server.admin.port)
    lines = [f"gatewise demo: proxy on {server.address}, admin on {server.admin.address}",
             f"  config     {config_path}",
             "",
             "Demo upstreams (in this process):"]
    routes = {"app": "route /", "broken": "route /broken"}
    for pool in ("app", "broken"):
        first = True
        for u in (u for u in ups if u.pool == pool):
            left = f'pool "{pool}" ({routes[pool]})' if first else ""
            lines.append(f"  {left:<30} {u.address:<21} {u.role}")
            first = False
    lines += [
        "",
        "Try:",
        f"  curl -i http://{proxy_addr}/            "
        "# 200; X-Upstream names the server (3:1 between the healthy two)",
        f"  curl -i http://{proxy_addr}/broken      "
        "# 502 with Proxy-Status: gatewise; error=connection_refused",
        f"  curl -s http://{admin_addr}/debug/upstreams   # every server's state, checks, failures",
        f"  open http://{admin_addr}/debug in a browser   # the same for people, plus recent errors",
        f"  {_command_prefix()} doctor -c {config_path}",
        "",
        "Ctrl-C stops the proxy and every demo upstream.",
    ]
    return "\n".join(lines)


async def _start_upstreams(ups: list[_Upstream], hint: str) -> None:
    from diagnostics.faults import FaultServer

    for u in ups:
        if u.mode == "refuse" and u.port:
            _check_free("127.0.0.1", u.port, f"demo upstream, {u.role}", hint)
        u.server = FaultServer(u.mode, "127.0.0.1", u.port)
        try:
            await u.server.start()
        except OSError as exc:
            u.server = None
            if exc.errno == errno.EADDRINUSE:
                raise PortBusy(u.port, f"demo upstream, {u.role}", hint) from None
            raise


async def _close_upstreams(ups: list[_Upstream]) -> None:
    for u in ups:
        if u.server is not None:
            await u.server.close()


async def _demo(listen: str, admin: str, listen_port: int, config_dir: str) -> int:
    from proxy.logs import log_event
    from proxy.server import Server

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # Handlers first: once anything accepts connections, a signal must stop it all cleanly.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)

    fixed = listen_port == DEFAULT_LISTEN_PORT
    ups = _upstreams(fixed)
    server: Server | None = None
    config_path = os.path.join(config_dir, CONFIG_NAME)
    try:
        await _start_upstreams(ups, hint=(
            "the demo uses 9001-9004 for its upstreams with the default --listen; "
            "choose another listen port (e.g. --listen 127.0.0.1:8081) and they take free ports"))
        data = _config_data(listen, admin, ups)
        cfg = parse_config(data, source=config_path)
        with open(config_path, "w", encoding="utf-8") as f:
            f.write("# Written by `gatewise demo`; removed when it stops.\n" + to_toml(data))
        server = Server(cfg)
        try:
            await server.start()
        except OSError as exc:
            failed_listen = server._server is None
            server = None
            if exc.errno != errno.EADDRINUSE:
                raise
            if failed_listen:
                raise PortBusy(cfg.listen.port, "proxy listener",
                               "choose another with --listen, e.g. --listen 127.0.0.1:8081") from None
            raise PortBusy(cfg.admin.port, "admin listener",
                           "choose another with --admin, e.g. --admin 127.0.0.1:9902") from None
        log_event("listening", address=server.address, admin=server.admin.address,
                  parser=server.proxy.parser_kind, hot_path=compiled.describe(), config=config_path,
                  pools={n: [s.url for s in p.servers] for n, p in server.proxy.pools.items()})
        print(_banner(server, ups, config_path), flush=True)
        await stop.wait()
        print("gatewise demo: stopping", flush=True)
        return 0
    finally:
        if server is not None:
            await server.stop(grace=2.0)
        await _close_upstreams(ups)
        try:
            os.unlink(config_path)
        except FileNotFoundError:
            pass


def main_demo(listen: str, admin: str) -> int:
    """`gatewise demo`: 0 after a clean stop, 1 when a port is busy, 2 on a bad address."""
    addresses = {}
    for flag, text in (("--listen", listen), ("--admin", admin)):
        try:
            addresses[flag] = parse_address(text)
        except ValueError as exc:
            print(f"gatewise demo: {flag}: {exc}, got {text!r}", file=sys.stderr)
            return 2
    import uvloop   # what `gatewise run` uses

    config_dir = tempfile.mkdtemp(prefix="gatewise-demo-")
    code = 1
    try:
        code = uvloop.run(_demo(listen, admin, addresses["--listen"][1], config_dir))
    except PortBusy as exc:
        print(f"gatewise demo: {exc}; {exc.hint}", file=sys.stderr)
        return 1
    except ConfigError as exc:   # e.g. --listen and --admin on the same port
        for problem in exc.problems:   # the addresses came from flags: name those
            problem = problem.replace("listen.address", "--listen").replace("admin.address", "--admin")
            print(f"gatewise demo: {problem}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"gatewise demo: cannot start: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:   # a signal before the handlers were installed
        code = 0
    finally:
        shutil.rmtree(config_dir, ignore_errors=True)
    if code == 0:
        print("stopped", flush=True)
    return code
