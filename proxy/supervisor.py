"""`listen.workers = N > 1`: one supervisor process and N workers sharing the port.

The supervisor (nginx's master, with a little more to do):
- reserves the listen port (a bound, never-listening SO_REUSEPORT socket, so port 0
  works and the port stays ours while a worker restarts); each worker listens on it
  with SO_REUSEPORT and the kernel spreads new connections over them;
- runs the active health checks once, owns every server's health state (passive
  failures reported by all workers count against one `max_fails`) and pushes each
  change to every worker (proxy/cluster.py), so all of them route alike;
- serves the admin listener, summing the workers' snapshots: /debug and /metrics
  describe the whole proxy, not one worker;
- restarts a worker that dies (logged, with its exit code or signal; a worker that keeps
  dying is restarted with a growing delay, up to MAX_BACKOFF);
- SIGTERM/SIGINT: every worker drains (timeouts.shutdown_grace), then it exits;
  SIGHUP: validates the file once, then every worker reloads it.
It never touches client traffic.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
import sys
import time

import proxy as proxy_package
from diagnostics.admin import admin_warning, start_admin
from proxy.channel import open_channel
from proxy.cluster import merge_metrics, merge_requests, merge_upstreams, state_of
from proxy.config import ProxyConfig, to_dict
from proxy.health import HealthChecker
from proxy.inspect import ProxyView
from proxy.logs import log_event, log_server_state
from proxy.runtime import Proxy

START_TIMEOUT = 15.0     # seconds for every worker to be listening
SNAPSHOT_TIMEOUT = 2.0   # an admin request waits this long for a busy worker
MAX_BACKOFF = 5.0        # seconds between restarts of a worker that keeps dying
STABLE_AFTER = 10.0      # a worker that lived this long restarts at once


class WorkerHandle:
    __slots__ = ("index", "process", "channel", "pid", "ready", "started_at", "restarts",
                 "quick_deaths", "pending", "reloaded")

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: asyncio.subprocess.Process | None = None
        self.channel = None
        self.pid: int | None = None
        self.ready: asyncio.Future | None = None
        self.started_at = 0.0
        self.restarts = 0
        self.quick_deaths = 0
        self.pending: dict[int, asyncio.Future] = {}  # snapshot id -> reply
        self.reloaded: asyncio.Future | None = None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None


def _reserve(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


class Supervisor:
    def __init__(self, cfg: ProxyConfig) -> None:
        self.cfg = cfg
        self.proxy: Proxy | None = None  # health state and the doctor; never serves clients
        self.admin = None
        self.workers = [WorkerHandle(i) for i in range(cfg.listen.workers)]
        self.stopping = False
        self.started = False
        self._checkers: list[HealthChecker] = []
        self._reservation: socket.socket | None = None
        self.host, self.port = cfg.listen.host, cfg.listen.port
        self._ids = itertools.count(1)
        self._round: asyncio.Future | None = None  # the latest snapshot round (snapshots)
        self._watchers: set[asyncio.Task] = set()

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def listening_fields(self) -> dict:
        return {"address": self.address, "admin": self.admin.address, "parser": self.proxy.parser_kind,
                "workers": len(self.workers), "pids": [h.pid for h in self.workers]}

    def status_fields(self) -> dict:
        return {"workers": len(self.workers)}

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.stop()  # workers already started drain and go
            raise

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        self._reservation = _reserve(self.cfg.listen.host, self.cfg.listen.port)
        self.port = self._reservation.getsockname()[1]
        self.proxy = Proxy(self.cfg, loop)
        self._start_checks()
        admin = self.cfg.admin
        self.admin = await start_admin(ClusterView(self), admin.host, admin.port)
        if warning := admin_warning(admin.host, admin.token):
            log_event("warning", message=warning)
        for handle in self.workers:
            await self._spawn(handle)
        try:  # a worker that exits first fails its `ready` (see _watch)
            await asyncio.wait_for(asyncio.gather(*(h.ready for h in self.workers)), START_TIMEOUT)
        except TimeoutError:
            raise OSError(f"workers not listening after {START_TIMEOUT:g} s") from None
        self.started = True

    async def stop(self) -> None:
        """Every worker drains (SIGTERM), then the supervisor's own parts stop."""
        self.stopping = True
        if self.proxy is not None:
            self.proxy.draining = True  # /readyz says 503 at once
        for handle in self.workers:
            if handle.alive:
                handle.process.send_signal(signal.SIGTERM)
        grace = self.cfg.timeouts.shutdown_grace + 5.0
        alive = [h.process.wait() for h in self.workers if h.alive]
        if alive:
            try:
                await asyncio.wait_for(asyncio.gather(*alive), grace)
            except TimeoutError:
                for handle in self.workers:
                    if handle.alive:
                        log_event("worker_killed", worker=handle.index, pid=handle.pid,
                                  reason=f"still running {grace:g} s after SIGTERM")
                        handle.process.kill()
                await asyncio.gather(*(h.process.wait() for h in self.workers if h.process is not None))
        if self._watchers:  # let each log its worker_stopped; one sleeping before a restart just ends
            _, sleeping = await asyncio.wait(list(self._watchers), timeout=1.0)
            for task in sleeping:
                task.cancel()
        for checker in self._checkers:
            await checker.stop()
        if self.proxy is not None:
            self.proxy.resolver.cancel()
        if self.admin is not None:
            await self.admin.close()
            self.admin = None
        if self._reservation is not None:
            self._reservation.close()

    def _start_checks(self) -> None:
        self._checkers = [HealthChecker(self.proxy, pool, pool.cfg.health, on_probe=self._pushed)
                          for pool in self.proxy.pools.values() if pool.cfg.health is not None]
        for checker in self._checkers:
            checker.start()

    async def reload(self, cfg: ProxyConfig) -> list[str]:
        """SIGHUP, with a config already validated: the supervisor's health state starts
        afresh, then every worker reloads (Server.reload) and says so."""
        notes = []
        if cfg.listen.address != self.cfg.listen.address:
            notes.append(f"listen.address stays {self.address} until a restart")
        if cfg.admin.address != self.cfg.admin.address:
            notes.append(f"admin.address stays {self.admin.address if self.admin else '-'} until a restart")
        if cfg.listen.workers != self.cfg.listen.workers:
            notes.append(f"listen.workers stays {len(self.workers)} until a restart")
        for checker in self._checkers:
            await checker.stop()
        old = self.proxy
        self.proxy, self.cfg = Proxy(cfg, old.loop), cfg
        old.resolver.cancel()
        self._start_checks()
        loop = asyncio.get_running_loop()
        acks = []
        for handle in self.workers:
            if handle.alive and handle.channel is not None and handle.ready.done():
                handle.reloaded = loop.create_future()
                acks.append(handle.reloaded)
                handle.channel.send(self._config_message())
        if acks:
            done, pending = await asyncio.wait(acks, timeout=START_TIMEOUT)
            if pending:
                notes.append(f"{len(pending)} worker(s) did not confirm the reload within {START_TIMEOUT:g} s")
        return notes

    # -- workers ----------------------------------------------------------------------------
    def _config_message(self) -> dict:
        data = to_dict(self.cfg, redact=False)
        data.pop("source", None)
        return {"t": "config", "config": data, "source": self.cfg.source, "port": self.port,
                "states": self._all_states()}

    def _all_states(self) -> list:
        now = self.proxy.loop.time()
        return [[pool.name, i, state_of(s, now)] for pool in self.proxy.pools.values()
                for i, s in enumerate(pool.servers)]

    async def _spawn(self, handle: WorkerHandle) -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        # the worker imports the same gatewise as this process, installed or not
        root = os.path.dirname(os.path.dirname(os.path.abspath(proxy_package.__file__)))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        try:
            handle.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "proxy.worker", "--fd", str(theirs.fileno()),
                "--index", str(handle.index), pass_fds=(theirs.fileno(),), env=env)
        finally:
            theirs.close()
        handle.pid = handle.process.pid
        handle.started_at = time.time()
        handle.ready = loop.create_future()
        handle.channel = await open_channel(ours, lambda m: self._on_message(handle, m), lambda: None)
        handle.channel.send(self._config_message())
        watcher = loop.create_task(self._watch(handle, handle.process))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)

    async def _watch(self, handle: WorkerHandle, process) -> None:
        code = await process.wait()
        lived = time.time() - handle.started_at
        if handle.channel is not None:
            handle.channel.close()
        for fut in handle.pending.values():
            if not fut.done():
                fut.cancel()
        handle.pending.clear()
        fields = {"signal": signal.Signals(-code).name} if code < 0 else {"code": code}
        if self.stopping:
            log_event("worker_stopped", worker=handle.index, pid=process.pid, **fields)
            return
        log_event("worker_exited", worker=handle.index, pid=process.pid, lived_s=round(lived, 3), **fields)
        if not handle.ready.done():
            if not self.started:  # never got to listen at start: a config or bind problem
                handle.ready.set_exception(OSError(f"worker {handle.index} exited before listening "
                                                   f"(its log line says why)"))
                return
            handle.ready.cancel()
        handle.quick_deaths = 0 if lived >= STABLE_AFTER else handle.quick_deaths + 1
        delay = min(MAX_BACKOFF, 0.1 * 2 ** (handle.quick_deaths - 1)) if handle.quick_deaths else 0.0
        if delay:
            await asyncio.sleep(delay)
        if self.stopping:
            return
        handle.restarts += 1
        await self._spawn(handle)

    def _on_message(self, handle: WorkerHandle, message: dict) -> None:
        kind = message["t"]
        if kind == "ready":
            if not handle.ready.done():
                handle.ready.set_result(None)
            log_event("worker_started", worker=handle.index, pid=message["pid"], restarts=handle.restarts)
        elif kind == "snapshot":
            fut = handle.pending.pop(message["id"], None)
            if fut is not None and not fut.done():
                fut.set_result(message["data"])
        elif kind == "reloaded":
            if handle.reloaded is not None and not handle.reloaded.done():
                handle.reloaded.set_result(message.get("notes"))
        elif kind in ("failure", "trial_ok"):
            self._passive(handle, message)

    def _passive(self, handle: WorkerHandle, message: dict) -> None:
        """A worker's live traffic judged a server: the one passive state machine decides."""
        pool = self.proxy.pools.get(message["pool"])
        index = message["server"]
        if pool is None or index >= len(pool.servers) or pool.servers[index].url != message.get("url"):
            return  # about a server of the config before a reload
        server = pool.servers[index]
        now = self.proxy.loop.time()
        seen = state_of(server, now)
        if message["t"] == "trial_ok":
            change = server.on_trial_ok()  # None unless ejected (the transition table)
            fields = {"by": "trial request"}
        else:
            change = server.on_failure(message["error"], message["details"], now, message["trial"])
            fields = {"by": "passive", "error": message["error"], "details": message["details"]}
        log_server_state(pool.name, server, change, worker=handle.index, **fields)
        # Pushed only when what a worker sees has changed: a transition, or a failed trial
        # that moves the ejection on (most failures only count towards max_fails).
        if state_of(server, now) != seen:
            self._pushed(pool, server)

    def _pushed(self, pool, server) -> None:
        """Tell every worker a server's state (after a probe or a passive verdict)."""
        index = pool.servers.index(server)
        message = {"t": "states", "servers": [[pool.name, index, state_of(server, self.proxy.loop.time())]]}
        for handle in self.workers:
            if handle.channel is not None and handle.alive:
                handle.channel.send(message)

    async def snapshots(self) -> list[dict]:
        """Every live worker's snapshot (a worker that does not answer in time is left out).
        Callers that ask while a round is under way share it (the /debug page asks for
        upstreams, requests and workers at once): the merges only read what they get."""
        if self._round is None or self._round.done():
            self._round = asyncio.ensure_future(self._ask_snapshots())
        return await asyncio.shield(self._round)

    async def _ask_snapshots(self) -> list[dict]:
        loop = asyncio.get_running_loop()
        asked = []
        for handle in self.workers:
            if handle.alive and handle.channel is not None and handle.ready is not None and handle.ready.done():
                request_id = next(self._ids)
                fut = handle.pending[request_id] = loop.create_future()
                handle.channel.send({"t": "snapshot", "id": request_id})
                asked.append((handle, request_id, fut))
        if not asked:
            return []
        await asyncio.wait([fut for _, _, fut in asked], timeout=SNAPSHOT_TIMEOUT)
        out = []
        for handle, request_id, fut in asked:
            handle.pending.pop(request_id, None)
            if fut.done() and not fut.cancelled():
                out.append({**fut.result(), "index": handle.index})
            else:
                fut.cancel()
        return out


class ClusterView:
    """The admin sources for the whole proxy: health from the supervisor, traffic summed
    over the workers' snapshots (diagnostics.admin awaits what these return)."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._sup = supervisor
        self._base = ProxyView(lambda: supervisor.proxy)

    @property
    def token(self) -> str:
        return self._sup.cfg.admin.token

    async def upstreams(self) -> dict:
        snaps = await self._sup.snapshots()
        return merge_upstreams(self._base.upstreams(), [s["upstreams"] for s in snaps])

    def out_reasons(self) -> dict[str, str]:
        return self._base.out_reasons()

    async def requests(self) -> list[dict]:
        snaps = await self._sup.snapshots()
        return merge_requests([s["requests"] for s in snaps], self._sup.cfg.diagnostics.recent_requests)

    async def request(self, request_id: str) -> dict | None:
        for snapshot in await self._sup.snapshots():
            for entry in snapshot["requests"]:
                if entry.get("request_id") == request_id:
                    return entry
        return None

    def config(self) -> dict:
        return self._base.config()

    async def metrics(self) -> dict:
        snaps = await self._sup.snapshots()
        merged = merge_metrics(self._base.metrics(), [s["metrics"] for s in snaps])
        merged["workers"] = self._workers(snaps)
        return merged

    async def workers(self) -> list[dict]:
        return self._workers(await self._sup.snapshots())

    def _workers(self, snaps: list[dict]) -> list[dict]:
        by_index = {s["index"]: s for s in snaps}
        out = []
        for handle in self._sup.workers:
            snap = by_index.get(handle.index)  # (None: the worker did not answer in time)
            out.append({"index": handle.index, "pid": handle.pid, "alive": handle.alive,
                        "started_at": round(handle.started_at, 3), "restarts": handle.restarts,
                        "client_connections": snap["metrics"]["client_connections"] if snap else None,
                        "requests_total": snap["requests_total"] if snap else None})
        return out

    def ready(self) -> bool:
        return any(h.alive for h in self._sup.workers) and self._base.ready()

    def doctor(self):
        return self._base.doctor()
