"""One worker process of `listen.workers > 1` (started by proxy/supervisor.py).

A worker is the ordinary data plane with three differences:
- it listens with SO_REUSEPORT on the port the supervisor reserved, so the kernel
  spreads new connections over the workers;
- it runs no health checks and decides no ejection: server states arrive from the
  supervisor, and failures go back to it (cluster.SharedServerState);
- it has no admin listener: it answers the supervisor's snapshot requests instead.

It takes its config from the supervisor (first message; later ones are reloads), drains
and exits 0 on SIGTERM/SIGINT, and does the same when the supervisor goes away (the
channel closes), so a killed supervisor never leaves workers behind.

    python -m proxy.worker --fd N --index I
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import signal
import socket

from proxy import logs
from proxy.channel import open_channel
from proxy.cluster import apply_state, shared_servers
from proxy.config import ConfigError, parse_config
from proxy.inspect import ProxyView
from proxy.logs import log_event
from proxy.memory import keep_read_buffers
from proxy.runtime import Proxy
from proxy.server import Server


class WorkerServer(Server):
    def __init__(self, cfg, port: int, report) -> None:
        super().__init__(cfg)
        self._port = port
        self._report = report

    def _new_proxy(self, cfg, loop) -> Proxy:
        return Proxy(cfg, loop, self._lookup, make_server=shared_servers(self._report))

    async def start(self, states: list) -> "WorkerServer":
        self.proxy = self._new_proxy(self.cfg, asyncio.get_running_loop())
        # Before the first connection. States pushed meanwhile wait in serve()'s inbox and
        # apply after these, in order.
        self.apply_states(states)
        await self._listen(self._port, reuse_port=True)
        return self

    def _start_checks(self) -> None:
        pass  # the supervisor probes, once for all workers

    def apply_states(self, entries: list) -> None:
        proxy = self.proxy
        now = proxy.loop.time()
        for pool_name, index, state in entries:
            pool = proxy.pools.get(pool_name)
            if pool is not None and index < len(pool.servers):
                apply_state(pool.servers[index], state, now)

    def snapshot(self) -> dict:
        """What the supervisor's admin listener sums over the workers."""
        proxy = self.proxy
        view = ProxyView(lambda: self.proxy)
        upstreams = view.upstreams()
        for name, pool in proxy.pools.items():
            for entry, server in zip(upstreams["pools"][name]["servers"], pool.servers):
                entry["latency_samples"] = server.latency.samples()
        return {"upstreams": upstreams, "metrics": view.metrics(), "requests": view.requests(),
                "requests_total": view.requests_total()}


def _config(message: dict):
    return parse_config(message["config"], source=message.get("source"))


async def serve(fd: int, index: int) -> int:
    logs.context["worker"] = index
    loop = asyncio.get_running_loop()
    # Every message, and the order to stop (None), is handled by one consumer in arrival
    # order. A config waits for the start or reload it asks for, so the "states" pushed
    # meanwhile apply after it, to the config they were meant for. (Handled as they came,
    # states pushed while a worker was starting were lost, and a restarted worker kept
    # using an ejected server.)
    inbox: asyncio.Queue[dict | None] = asyncio.Queue()
    stop = functools.partial(inbox.put_nowait, None)
    # the supervisor gone (the channel closed): finish what is in flight and go
    channel = await open_channel(socket.socket(fileno=fd), inbox.put_nowait, stop)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    loop.add_signal_handler(signal.SIGHUP, lambda: None)  # reloads come through the supervisor
    server: WorkerServer | None = None
    draining: asyncio.Task | None = None
    while True:
        message = await inbox.get()
        if message is None:  # the order to stop
            if server is None:
                return 1  # stopped before any config arrived
            if draining is None:
                # Drain in a task and go on reading: while the requests in flight finish,
                # the supervisor still asks for snapshots (/debug, /metrics) and pushes
                # server states (a retry must not pick a server ejected meanwhile).
                draining = loop.create_task(server.stop())
                draining.add_done_callback(lambda _: inbox.put_nowait({"t": "drained"}))
            continue
        kind = message["t"]
        if server is None:
            # open_channel, then the config: the supervisor's first message is always it
            assert kind == "config", message
            server = WorkerServer(_config(message), message["port"], channel.send)
            try:
                await server.start(message["states"])
            except OSError as exc:
                log_event("listen_failed", address=server.cfg.listen.address, error=str(exc))
                return 1
            channel.send({"t": "ready", "pid": os.getpid()})
        elif kind == "drained":
            break
        elif kind == "config":
            if draining is None:  # (a reload that comes while draining has nothing to serve)
                await _reload(server, message, channel)
        elif kind == "states":
            server.apply_states(message["servers"])
        elif kind == "snapshot":
            channel.send({"t": "snapshot", "id": message["id"], "data": server.snapshot()})
    await draining  # (done: raises what stop() raised)
    channel.close()
    return 0


async def _reload(server: WorkerServer, message: dict, channel) -> None:
    try:
        cfg = _config(message)
    except ConfigError as exc:  # the supervisor validated it: only a bug gets here
        log_event("reload_rejected", problems=exc.problems)
        return
    notes = await server.reload(cfg)
    server.apply_states(message["states"])
    channel.send({"t": "reloaded", "notes": notes})


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m proxy.worker")
    parser.add_argument("--fd", type=int, required=True, help="the channel socket, inherited")
    parser.add_argument("--index", type=int, required=True)
    args = parser.parse_args()
    keep_read_buffers()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        uvloop = None
    code = (uvloop.run if uvloop is not None else asyncio.run)(serve(args.fd, args.index))
    # Drained and about to exit. A Ctrl-C reaches the whole process group, then the
    # supervisor's SIGTERM follows: one arriving now (the loop's handlers are gone)
    # must not turn a clean exit into death by signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
