"""`listen.workers = 2`, for real: `gatewise run -c FILE` as a subprocess (a supervisor and
two SO_REUSEPORT workers) in front of fault upstreams in this test's event loop.

What is checked is what an operator sees: statuses, X-Upstream (which upstream answered),
/debug and /metrics from the supervisor's admin listener (the whole proxy, not one worker),
the JSON log lines on stderr (workers log through the supervisor's stderr, with "worker"),
pids and exit codes.

Ordering barrier used below: the supervisor writes a state change to every worker's
channel in the same step that changes it, and an admin request asks every worker for a
snapshot over that same ordered channel. So once /debug/upstreams shows a state, the
*next* admin request returns only after every worker has applied it.

Stray traffic: other processes on this machine may send requests to any listener here
(`gatewise doctor` tries the listeners nearest a refusing port, and another test suite
may be running it). So the tests count only their own traffic: their requests use
PREFIX, routed to pool "app"; anything else goes to pool "stray" (its own upstream),
and health probes are counted at the upstream by a path of their own.

Teardown: the supervisor is asked to stop (SIGTERM, so it reaps its workers); whatever is
still running afterwards, supervisor or worker, is SIGKILLed, even when a test failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
from collections import Counter
from pathlib import Path

import orjson
import pytest

from proxy.config import to_toml
from tests.conftest import http
from tests.procs import ProxyProc, children, cmdline, proc_stat
from tests.rawclient import eventually, until

WORKERS = 2
PREFIX = "/workers-test/"   # our requests; routed to pool "app" (anything else: pool "stray")
FRESH = 40          # separate connections: the kernel spreads them over the workers
GRACE = 3.0         # timeouts.shutdown_grace in these configs: a stuck drain stays short


# ---- helpers ---------------------------------------------------------------------------------

def pid_running(pid: int) -> bool:
    """True while the process exists and is not a zombie (an orphan's zombie may linger if
    PID 1 does not reap: it runs nothing)."""
    stat = proc_stat(pid)
    return stat is not None and stat[0] not in (b"Z", b"X")


def is_worker(pid: int) -> bool:
    return b"proxy.worker" in cmdline(pid)


def worker_children(parent: int, index: int) -> list[int]:
    """Pids of `python -m proxy.worker --index INDEX` processes whose parent is `parent`."""
    found = []
    for pid in children(parent):
        argv = cmdline(pid)
        if b"proxy.worker" in argv and b"--index" in argv and argv[argv.index(b"--index") + 1] == str(index).encode():
            found.append(pid)
    return found


async def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Poll (with a deadline) until none of `pids` runs; returns those still running."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (left := [p for p in pids if pid_running(p)]) and loop.time() < deadline:
        await asyncio.sleep(0.02)   # polling pace
    return left


class Cluster:
    """One `gatewise run` with workers > 1 and what its log said."""

    def __init__(self, gw: ProxyProc) -> None:
        self.gw = gw
        self.port = 0
        self.admin_port = 0
        self.pids: list[int] = []

    async def started(self) -> "Cluster":
        self.port = await self.gw.wait_listening()
        event = await self.gw.wait_event("listening")
        self.admin_port = int(event["admin"].rsplit(":", 1)[1])
        self.pids = list(event["pids"])
        assert event["workers"] == WORKERS and len(set(self.pids)) == WORKERS, event
        return self

    def worker_pids(self) -> set[int]:
        """Every worker pid this supervisor ever reported."""
        return set(self.pids) | {e["pid"] for e in self.gw.events
                                 if e.get("event") == "worker_started" and "pid" in e}

    def events(self, name: str, **match) -> list[dict]:
        return [e for e in self.gw.events if e.get("event") == name
                and all(e.get(k) == v for k, v in match.items())]

    async def wait_for(self, name: str, timeout: float = 10.0, **match) -> dict:
        return await self.gw._wait_for(lambda: next(iter(self.events(name, **match)), None),
                                       f"{name} {match}", timeout)

    async def admin(self, path: str):
        reply = await http(self.admin_port, path=path)
        assert reply.status == 200, (path, reply.status, reply.body[:300])
        return orjson.loads(reply.body) if path != "/metrics" else reply.body.decode()

    async def workers(self) -> dict[int, dict]:
        return {w["index"]: w for w in (await self.admin("/debug/workers"))["workers"]}

    async def server(self, url: str) -> dict:
        """The /debug/upstreams entry of one server (pool "app")."""
        servers = (await self.admin("/debug/upstreams"))["pools"]["app"]["servers"]
        return next(s for s in servers if s["url"] == url)

    async def get(self, **kw):
        """One request of ours (PREFIX: pool "app") on a fresh connection."""
        return await http(self.port, path=PREFIX, **kw)

    async def fresh(self, n: int) -> list:
        """n requests of ours, each on its own connection (one after another)."""
        return [await self.get() for _ in range(n)]

    @contextlib.asynccontextmanager
    async def request_in_flight(self, url: str):
        """A request of ours (a task) that the admin shows in flight to `url`; cancelled on
        the way out if it has not finished."""
        task = asyncio.create_task(self.get(timeout=10))
        try:
            async def active():
                return (await self.server(url))["active_requests"] >= 1
            await until(active, f"a request in flight to {url}", 5.0)
            yield task
        finally:
            if not task.done():
                task.cancel()

    async def close(self) -> None:
        gw = self.gw
        try:
            if gw.returncode is None:
                gw.send_signal(signal.SIGTERM)
                await gw.wait_exit(GRACE + 5.0)
        except (TimeoutError, ProcessLookupError):
            pass
        finally:
            await gw.close()   # SIGKILL if still running, reap, stop the readers
            for pid in self.worker_pids():   # a worker left behind by a failed test
                if pid_running(pid) and is_worker(pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            await wait_gone(list(self.worker_pids()), 5.0)


class Harness:
    def __init__(self, stray_url: str) -> None:
        self.stray_url = stray_url
        self.started: list[Cluster] = []

    def config(self, path: Path, servers: list[str], *, pool: dict | None = None, **sections) -> Path:
        """listen and admin on 127.0.0.1:0, workers = 2, pool "app" of `servers` for PREFIX,
        pool "stray" for anything else; `sections` add or override tables."""
        data: dict = {"listen": {"address": "127.0.0.1:0", "workers": WORKERS},
                      "admin": {"address": "127.0.0.1:0"}, "timeouts": {"shutdown_grace": GRACE}}
        for name, table in sections.items():
            data.setdefault(name, {}).update(table)
        data["pools"] = {"app": {**(pool or {}), "servers": [{"url": url} for url in servers]},
                         "stray": {"servers": [{"url": self.stray_url}]}}
        data["routes"] = [{"path_prefix": PREFIX, "pool": "app"}, {"path_prefix": "/", "pool": "stray"}]
        path.write_text(to_toml(data))
        return path

    async def start(self, cfg: Path, *, new_session: bool = False) -> Cluster:
        c = Cluster(await ProxyProc.start("run", "-c", str(cfg), new_session=new_session))
        self.started.append(c)
        return await c.started()


@pytest.fixture
async def cluster(upstream):
    """`cluster.config(...)` writes a config, `await cluster.start(path)` runs it; every
    cluster is stopped and reaped at teardown."""
    harness = Harness((await upstream("ok", name="stray")).url)
    yield harness
    for c in reversed(harness.started):
        await c.close()


class PathCounter:
    """An upstream that answers 200 to everything and counts requests per target (a test
    counts its own path: see "Stray traffic" above)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._changed = asyncio.Event()
        self._server: asyncio.AbstractServer | None = None
        self.url = ""

    async def start(self) -> "PathCounter":
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                head = await reader.readuntil(b"\r\n\r\n")
                parts = head.split(b" ", 2)
                if len(parts) == 3:
                    self.counts[parts[1].decode("latin-1")] += 1
                    self._changed.set()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n")
                await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def wait(self, target: str, n: int, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while self.counts[target] < n:
                self._changed.clear()
                await self._changed.wait()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')


def samples(text: str, name: str) -> list[tuple[dict, float]]:
    """(labels, value) of every sample of one metric in the Prometheus text."""
    out = []
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and m[1] == name:
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m[2] or ""))
            out.append((labels, float(m[3])))
    return out


def total(text: str, name: str, **match) -> float:
    return sum(v for labels, v in samples(text, name) if all(labels.get(k) == x for k, x in match.items()))


# ---- traffic: one proxy, two processes --------------------------------------------------------

async def test_port_0_two_workers_share_the_port_and_the_admin_counts_the_whole_proxy(cluster, upstream, tmp_path):
    up = await upstream("ok", name="app")
    c = await cluster.start(cluster.config(tmp_path / "gw.toml", [up.url]))
    assert c.port != 0                                   # port 0: the log line names the real one
    replies = await c.fresh(FRESH)
    assert [r.status for r in replies] == [200] * FRESH
    assert {r.body for r in replies} == {b"hello\n"} and {r.header("x-upstream") for r in replies} == {"app"}

    workers = await c.workers()
    assert sorted(workers) == [0, 1]
    assert {w["pid"] for w in workers.values()} == set(c.pids)
    assert all(w["alive"] and w["restarts"] == 0 for w in workers.values()), workers
    assert all(w["requests_total"] > 0 for w in workers.values()), workers   # both served
    assert sum(w["requests_total"] for w in workers.values()) >= FRESH       # (+ stray traffic)

    entry = await c.server(up.url)
    assert entry["requests_total"] == FRESH and entry["failures_total"] == 0
    assert entry["latency_ms"]["p50"] is not None

    metrics = await c.admin("/metrics")
    assert total(metrics, "gatewise_requests_total", pool="app", server=up.address) == FRESH
    assert total(metrics, "gatewise_requests_total", pool="app", server=up.address, code="2xx") == FRESH
    assert total(metrics, "gatewise_workers") == WORKERS
    by_worker = {labels["worker"]: v for labels, v in samples(metrics, "gatewise_worker_requests_total")}
    assert set(by_worker) == {"0", "1"} and min(by_worker.values()) > 0
    # one scrape, one set of snapshots: the workers' totals add up to the pools' totals
    assert sum(by_worker.values()) == total(metrics, "gatewise_requests_total")
    assert {labels["worker"]: v for labels, v in samples(metrics, "gatewise_worker_restarts_total")} == \
        {"0": 0, "1": 0}
    assert {labels["worker"] for labels, _ in samples(metrics, "gatewise_worker_client_connections")} == {"0", "1"}
    assert total(metrics, "gatewise_upstream_latency_seconds_count", pool="app", server=up.address) == FRESH

    page = await http(c.admin_port, path="/debug")
    assert page.status == 200
    text = page.body.decode()
    assert "2 workers, figures summed" in text and all(f"pid {pid}" in text for pid in c.pids), text[:2000]


async def test_failures_from_both_workers_are_all_in_debug_requests(cluster, upstream, tmp_path):
    down = await upstream("refuse")
    c = await cluster.start(cluster.config(tmp_path / "gw.toml", [down.url],
                                           pool={"retries": 0, "passive": {"max_fails": 0}}))
    n = 20
    replies = await c.fresh(n)
    assert [r.status for r in replies] == [502] * n
    ids = [r.header("x-request-id") for r in replies]
    assert all(ids) and len(set(ids)) == n
    assert all(r.our_status()["error"] == "connection_refused" for r in replies)

    logged = await c.gw.wait_count("request_failed", n)
    assert {e["request_id"] for e in logged} == set(ids)
    assert {e["worker"] for e in logged} == {0, 1}        # both workers failed some

    listed = await c.admin("/debug/requests")
    assert {e["request_id"] for e in listed} == set(ids)
    assert [e["at"] for e in listed] == sorted((e["at"] for e in listed), reverse=True)   # newest first
    for request_id in ids:
        entry = await c.admin(f"/debug/requests/{request_id}")
        assert entry["request_id"] == request_id and entry["error"] == "connection_refused"
    missing = await http(c.admin_port, path="/debug/requests/000000000000000000000000")
    assert missing.status == 404

    metrics = await c.admin("/metrics")
    assert total(metrics, "gatewise_generated_responses_total", error="connection_refused") == n
    assert (await c.server(down.url))["failures_total"] == n


# ---- health: checked once, the same state everywhere ----------------------------------------

async def test_health_checks_run_once_in_the_supervisor_not_per_worker(cluster, tmp_path):
    interval, probe = 0.2, "/health-probed-once"
    up = await PathCounter().start()
    try:
        c = await cluster.start(cluster.config(tmp_path / "gw.toml", [up.url], pool={
            "health": {"path": probe, "interval": interval, "timeout": 1.0}}))
        await up.wait(probe, up.counts[probe] + 1, timeout=5)
        loop = asyncio.get_running_loop()
        first, t0 = up.counts[probe], loop.time()
        k = 6
        await up.wait(probe, first + k, timeout=10)
        elapsed = loop.time() - t0
        # One checker: k more probes need at least k intervals jittered down by 10% (a late
        # wake-up above shortens it by a few ms at most). Two or three checkers, one per
        # process, would do it in half or a third of that.
        assert elapsed >= k * interval * 0.75, f"{k} probes in {elapsed:.3f} s: more than one checker"

        # every probe the upstream saw is one the supervisor counted (one may be in flight)
        metrics = await c.admin("/metrics")
        seen = up.counts[probe]
        counted = total(metrics, "gatewise_health_checks_total", pool="app")
        assert counted <= seen <= counted + 2, (counted, seen)
        assert total(metrics, "gatewise_health_checks_total", result="fail") == 0
        assert (await c.server(up.url))["state"] == "healthy"
        assert not c.events("server_state", worker=0) and not c.events("server_state", worker=1)
    finally:
        await up.close()


async def test_a_server_that_fails_its_health_check_gets_no_request_from_any_worker(cluster, upstream, tmp_path):
    good, bad = await upstream("ok", name="good"), await upstream("status:503", name="bad")
    c = await cluster.start(cluster.config(tmp_path / "gw.toml", [bad.url, good.url],
                                           pool={"health": {"path": "/health", "interval": 0.1,
                                                            "timeout": 1.0, "fall": 1, "rise": 1}}))
    event = await c.wait_for("server_state", server=bad.address, new="unhealthy")
    assert event["by"] == "health_check" and "worker" not in event     # decided by the supervisor
    assert (await c.server(bad.url))["state"] == "unhealthy"
    before_workers = await c.workers()                                 # barrier: both workers know
    before = (await c.server(bad.url))["requests_total"]

    replies = await c.fresh(FRESH)
    assert [r.status for r in replies] == [200] * FRESH
    assert {r.header("x-upstream") for r in replies} == {"good"}
    assert (await c.server(bad.url))["requests_total"] == before == 0
    after_workers = await c.workers()
    assert all(after_workers[i]["requests_total"] > before_workers[i]["requests_total"] for i in (0, 1)), \
        (before_workers, after_workers)
    assert not c.events("request_failed")


async def test_a_passive_ejection_in_one_worker_holds_in_every_worker(cluster, upstream, tmp_path):
    refusing, good = await upstream("refuse"), await upstream("ok", name="good")
    c = await cluster.start(cluster.config(tmp_path / "gw.toml", [refusing.url, good.url],
                                           pool={"passive": {"max_fails": 1, "fail_window": 30.0,
                                                             "eject_for": 120.0}}))
    # One request at a time until some worker's round robin meets the refusing server
    # (it is listed first, so that is every worker's first or second pick); the retry
    # answers from the good one. Check the supervisor's verdict before the next request.
    sent = 0
    for _ in range(10):
        reply = await c.get()
        sent += 1
        assert reply.status == 200 and reply.header("x-upstream") == "good"
        if (await c.server(refusing.url))["state"] == "ejected":
            break
    else:
        pytest.fail(f"{refusing.url} never ejected after {sent} requests")
    ejected = c.events("server_state", server=refusing.address, new="ejected")
    assert len(ejected) == 1 and ejected[0]["by"] == "passive" and ejected[0]["worker"] in (0, 1), ejected
    assert ejected[0]["error"] == "connection_refused"

    entry = await c.server(refusing.url)                               # barrier: both workers know
    assert entry["failures_total"] == 1 and entry["requests_total"] == 1, entry
    before_workers = await c.workers()

    replies = await c.fresh(FRESH)
    assert [r.status for r in replies] == [200] * FRESH
    assert {r.header("x-upstream") for r in replies} == {"good"}
    after_workers = await c.workers()
    assert all(after_workers[i]["requests_total"] > before_workers[i]["requests_total"] for i in (0, 1))
    entry = await c.server(refusing.url)
    assert (entry["state"], entry["failures_total"], entry["requests_total"]) == ("ejected", 1, 1), entry
    assert entry["failures_by_error"] == {"connection_refused": 1}
    assert (await c.server(good.url))["requests_total"] == sent + FRESH
    metrics = await c.admin("/metrics")
    assert total(metrics, "gatewise_server_state", server=refusing.address, state="ejected") == 1
    assert total(metrics, "gatewise_upstream_failures_total", server=refusing.address) == 1


# ---- process lifecycle -------------------------------------------------------------------------

async def test_a_killed_worker_is_logged_and_restarted(cluster, upstream, tmp_path):
    up = await upstream("ok", name="app")
    c = await cluster.start(cluster.config(tmp_path / "gw.toml", [up.url]))
    victim = c.pids[0]
    os.kill(victim, signal.SIGKILL)
    exited = await c.wait_for("worker_exited", worker=0)
    assert exited["pid"] == victim and exited["signal"] == "SIGKILL" and "code" not in exited, exited
    restarted = await c.wait_for("worker_started", worker=0, restarts=1)
    assert restarted["pid"] not in c.pids and pid_running(restarted["pid"])
    assert await wait_gone([victim], 5.0) == []

    workers = await c.workers()
    assert workers[0]["pid"] == restarted["pid"] and workers[0]["restarts"] == 1 and workers[0]["alive"]
    assert workers[1]["pid"] == c.pids[1] and workers[1]["restarts"] == 0 and workers[1]["alive"]

    replies = await c.fresh(FRESH)
    assert [r.status for r in replies] == [200] * FRESH
    workers = await c.workers()
    assert workers[0]["requests_total"] > 0 and workers[1]["requests_total"] > 0, workers  # the new one serves
    metrics = await c.admin("/metrics")
    assert {labels["worker"]: v for labels, v in samples(metrics, "gatewise_worker_restarts_total")} == \
        {"0": 1, "1": 0}
    assert total(metrics, "gatewise_workers") == WORKERS
    assert c.gw.returncode is None and not c.events("worker_exited", worker=1)


async def test_a_restarted_worker_learns_an_ejection_made_while_it_was_starting(cluster, upstream, tmp_path):
    """Regression: a state change pushed while a worker was starting (after its config
    message, before it served) was dropped by the worker ("still starting"), and without
    active checks nothing pushed it again: the restarted worker kept sending to a server
    every other process had ejected (failures_total went 1 -> 2 -> ...)."""
    refusing, good = await upstream("refuse"), await upstream("ok", name="good")
    c = await cluster.start(cluster.config(tmp_path / "gw.toml", [refusing.url, good.url],
                                           pool={"passive": {"max_fails": 1, "fail_window": 30.0,
                                                             "eject_for": 120.0}}))
    supervisor = c.gw.proc.pid
    os.kill(c.pids[0], signal.SIGKILL)
    await c.wait_for("worker_exited", worker=0)
    # the restart is not logged until the new worker is ready: look for the process
    spawned = await eventually(lambda: worker_children(supervisor, 0), "worker 0 restarted", 10.0, pace=0.005)
    # Worker 0 is starting (its config is on the way); worker 1 alone listens, and its
    # first pick is the refusing server (listed first): one failure ejects it.
    reply = await c.get()
    assert reply.status == 200 and reply.header("x-upstream") == "good"
    ejected = await c.wait_for("server_state", server=refusing.address, new="ejected")
    started = await c.wait_for("worker_started", worker=0, restarts=1)
    assert started["pid"] in spawned
    # the window this test is about: the ejection came while worker 0 was starting
    assert c.gw.events.index(ejected) < c.gw.events.index(started)
    entry = await c.server(refusing.url)
    assert (entry["state"], entry["failures_total"]) == ("ejected", 1), entry

    replies = await c.fresh(FRESH)
    assert [r.status for r in replies] == [200] * FRESH
    assert (await c.workers())[0]["requests_total"] > 0                     # the new worker served
    entry = await c.server(refusing.url)
    assert (entry["failures_total"], entry["requests_total"]) == (1, 1), entry


async def test_sigterm_drains_every_worker_then_exits_0(cluster, upstream, tmp_path):
    slow = await upstream("slow:2", name="slow")
    c = await cluster.start(cluster.config(tmp_path / "gw.toml", [slow.url]))
    async with c.request_in_flight(slow.url) as in_flight:
        assert not in_flight.done()
        await c.gw.wait_handles(signal.SIGTERM)
        c.gw.send_signal(signal.SIGTERM)
        await c.wait_for("draining")
        # Regression: a draining worker stopped reading its channel, so /debug went without
        # it (after the snapshot timeout) and showed the request in flight as gone.
        assert (await c.server(slow.url))["active_requests"] == 1
        assert not in_flight.done()
        reply = await in_flight
    assert reply.status == 200 and reply.body == b"hello\n" and reply.header("x-upstream") == "slow"
    assert await c.gw.wait_exit(GRACE + 5.0) == 0
    stopped = c.events("worker_stopped")
    assert sorted(e["worker"] for e in stopped) == [0, 1], stopped
    assert all(e.get("code") == 0 for e in stopped), stopped   # each worker drained and exited on its own
    assert c.events("stopped") and not c.events("worker_killed") and not c.events("drain_timeout")
    names = [e["event"] for e in c.gw.events]
    assert names.index("stopped") > max(i for i, n in enumerate(names) if n == "worker_stopped")
    assert await wait_gone(c.pids, 1.0) == []                  # reaped by the supervisor


async def test_ctrl_c_reaches_the_whole_group_and_every_process_exits_cleanly(cluster, upstream, tmp_path):
    """A terminal's Ctrl-C sends SIGINT to the process group: workers and supervisor at
    once, then the supervisor's own SIGTERM reaches workers that are already draining.
    Every worker still exits with code 0, not by a signal."""
    ok = await upstream("ok", name="ok")
    c = await cluster.start(cluster.config(tmp_path / "gw.toml", [ok.url]), new_session=True)
    assert (await c.get()).status == 200
    await c.gw.wait_handles(signal.SIGINT)
    os.killpg(c.gw.proc.pid, signal.SIGINT)
    assert await c.gw.wait_exit(GRACE + 5.0) == 0
    stopped = c.events("worker_stopped")
    assert sorted(e["worker"] for e in stopped) == [0, 1], stopped
    assert all(e.get("code") == 0 for e in stopped), stopped
    assert await wait_gone(c.pids, 1.0) == []


async def test_sighup_reloads_every_worker_and_a_bad_file_keeps_the_old_config(cluster, upstream, tmp_path):
    first, second = await upstream("ok", name="first"), await upstream("ok", name="second")
    cfg = cluster.config(tmp_path / "gw.toml", [first.url])
    c = await cluster.start(cfg)
    assert {r.header("x-upstream") for r in await c.fresh(10)} == {"first"}

    cluster.config(cfg, [second.url])
    await c.gw.wait_handles(signal.SIGHUP)
    c.gw.send_signal(signal.SIGHUP)
    event = await c.wait_for("reloaded")
    assert event["workers"] == WORKERS and not event.get("notes"), event
    assert event["pools"]["app"] == [second.url]
    replies = await c.fresh(30)
    assert [r.status for r in replies] == [200] * 30
    assert {r.header("x-upstream") for r in replies} == {"second"}
    workers = await c.workers()
    assert all(w["requests_total"] > 0 for w in workers.values()), workers   # both reloaded workers served
    assert {w["pid"] for w in workers.values()} == set(c.pids)              # reloaded, not restarted
    assert [s["url"] for s in (await c.admin("/debug/upstreams"))["pools"]["app"]["servers"]] == [second.url]

    cfg.write_text(cfg.read_text() + "\n[pools.app.health]\nrise = 0\n")
    c.gw.send_signal(signal.SIGHUP)
    rejected = await c.wait_for("reload_rejected")
    assert any(p.startswith("pools.app.health.rise") for p in rejected["problems"]), rejected
    assert "worker" not in rejected                                          # the supervisor said no
    replies = await c.fresh(10)
    assert [r.status for r in replies] == [200] * 10
    assert {r.header("x-upstream") for r in replies} == {"second"}
    assert len(c.events("reloaded")) == 1 and len(c.events("reload_rejected")) == 1
    assert c.gw.returncode is None and not c.events("worker_exited")


async def test_workers_of_a_killed_supervisor_finish_in_flight_work_and_exit(cluster, upstream, tmp_path):
    slow = await upstream("slow:0.5", name="slow")
    c = await cluster.start(cluster.config(tmp_path / "gw.toml", [slow.url]))
    async with c.request_in_flight(slow.url) as in_flight:
        c.gw.proc.kill()
        assert await c.gw.proc.wait() == -signal.SIGKILL
        reply = await in_flight
    assert reply.status == 200 and reply.header("x-upstream") == "slow"    # drained, not dropped
    assert await wait_gone(c.pids, 10.0) == [], "orphaned workers still running"
    # stderr reaches EOF only once every worker has closed it: all gone
    assert await c.gw.wait_exit(5.0) == -signal.SIGKILL
    assert not c.events("worker_started", restarts=1)
