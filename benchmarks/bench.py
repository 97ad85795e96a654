"""Load benchmark of the forwarding path: wrk through gatewise, nginx and HAProxy, side by side.

    .venv/bin/python benchmarks/bench.py            # full: 3 interleaved x 10 s per run (make bench)
    .venv/bin/python benchmarks/bench.py --quick    # smoke run, about a minute (make bench-quick)

One run:

1. checks for wrk and nginx; when one is missing and we are root, installs it with apt-get
   (`apt-get update` once, then `apt-get install -y wrk nginx-light`, falling back to the
   `nginx` package) and says so; not root: a message naming the command, exit status 2.
2. starts a backend nginx (1 worker): `GET /` -> "hello\\n", `/health`, 16 KiB and 1 MiB
   files, and `POST /upload` (body read and discarded, "ok\\n").
3. starts the proxies under test, each on a free loopback port: gatewise
   (`python -m proxy run -c <generated config>`: the default feature set, i.e. active
   health checks, passive checks, admin listener with /metrics and /debug, the recorder,
   request ids, X-Forwarded-*, Via; its hot path compiled, as `make` builds it),
   "gatewise-py" (the same source as plain Python: GATEWISE_PURE=1, see setup.py),
   "gatewise-w2" (compiled, with listen.workers = 2, not pinned), nginx as a proxy (1 worker, upstream keepalive 32,
   HTTP/1.1 upstream, no disk buffering), and HAProxy (1 thread, http-reuse always) when
   `haproxy` is installed (never installed by this script), "floor"
   (benchmarks/floor.py: the least a Python forwarder does per request on gatewise's
   stack, uvloop + httptools with no features) and "floor+features" (the same doing
   gatewise's per-request feature work inline), both plain Python (the issue's
   yardstick), pinned like the proxies.
4. pins the proxy under test to CPU 0 and the backend and `wrk -t1` to CPU 1 (taskset,
   2+ CPUs; `--no-pin` to skip; for GET / c1 the proxy joins them on CPU 1, as in the
   issue's c1 figure: across cores a c1 ping-pong measures wake-ups, not the proxy), and
   runs every scenario against every target:
   "direct" (wrk -> backend) and each proxy, interleaved: each repetition runs every
   scenario, and inside a scenario every target in turn. Medians are reported.
5. prints one table: req/s, p50/p99, CPU us/request of the proxy's processes
   (utime+stime from /proc/<pid>/stat over the wrk run / responses; stime also apart, as
   "of it kernel"), MiB/s of body
   scenarios, ratios to nginx and to direct; then the added latency at c1 (p50 - direct
   p50), the proxies' RSS across the run, and the issue 5 targets.
6. measures idle keep-alive client connections: fresh proxies (not the floor), N connections (default
   10,000) that each made one request and stay open; RSS per connection.
7. writes everything as JSON to benchmarks/results/<timestamp>.json (or --json FILE).

`--src DIR` (repeatable) runs gatewise from another checkout, so two versions are measured
in one interleaved run under the same noise, e.g. before/after a change:

    git clone -q /work/main /tmp/before && git -C /tmp/before checkout -q <commit>
    .venv/bin/python benchmarks/bench.py --src /tmp/before --src . --scenario get_c50 --targets direct,gatewise

Loopback only. Every process started here is stopped at the end (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import functools
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")
MIB = 1024 * 1024
GATEWISE_TARGETS = ("gatewise", "gatewise-py", "gatewise-w2")  # run from --src trees
TARGETS = ("direct", *GATEWISE_TARGETS, "nginx", "haproxy", "floor", "floor+features")  # table order
SBIN = "/usr/local/sbin:/usr/sbin:/sbin"
NOFILE = 65536                     # RLIMIT_NOFILE wanted for the proxies and the idle client


class BenchError(Exception):
    """A problem reported as one message, without a traceback."""


# --- scenarios -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    path: str
    connections: int
    response_bytes: int = 0        # body size of a GET body scenario (MiB/s reported)
    request_bytes: int = 0         # POST body size (MiB/s reported)
    one_core: bool = False         # the proxy joins the backend and wrk on their CPU for this one

    @property
    def body_bytes(self) -> int:
        return self.response_bytes or self.request_bytes


SCENARIOS = [
    Scenario("get_c1", "GET / c1", "/", 1, one_core=True),
    Scenario("get_c50", "GET / c50", "/", 50),
    Scenario("get_c256", "GET / c256", "/", 256),
    Scenario("get_16k_c50", "GET 16 KiB c50", "/files/16k.bin", 50, response_bytes=16 * 1024),
    Scenario("get_1m_c50", "GET 1 MiB c50", "/files/1m.bin", 50, response_bytes=MIB),
    Scenario("post_300k_c50", "POST 300 KB c50", "/upload", 50, request_bytes=300_000),
]
BY_NAME = {s.name: s for s in SCENARIOS}


# --- tools -----------------------------------------------------------------------------------

def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=SBIN)


def ensure_tools(install: bool) -> dict[str, str]:
    """Paths of wrk and nginx (and haproxy when present); installs the missing ones as root."""
    missing = [t for t in ("wrk", "nginx") if _which(t) is None]
    if missing:
        packages = ["wrk" if t == "wrk" else "nginx-light" for t in missing]
        cmd = "apt-get install -y " + " ".join(packages)
        if not install:
            raise BenchError(f"missing: {', '.join(missing)} (--no-install given). Install them: {cmd}")
        if os.geteuid() != 0:
            raise BenchError(f"missing: {', '.join(missing)}. Run this as root to have them installed "
                             f"with apt-get, or install them yourself: sudo apt-get update && sudo {cmd}")
        if _which("apt-get") is None:
            raise BenchError(f"missing: {', '.join(missing)}, and there is no apt-get here; "
                             f"install wrk and nginx with the system's package manager")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        print(f"bench: {', '.join(missing)} not found; installing with apt-get: "
              f"apt-get update, then {cmd}", flush=True)
        if subprocess.run(["apt-get", "update", "-q"], env=env).returncode != 0:
            raise BenchError("apt-get update failed (see its output above)")
        if subprocess.run(["apt-get", "install", "-y", "-q", *packages], env=env).returncode != 0:
            if "nginx-light" not in packages:
                raise BenchError(f"{cmd} failed (see its output above)")
            packages = ["nginx" if p == "nginx-light" else p for p in packages]
            print(f"bench: retrying with the nginx package: apt-get install -y {' '.join(packages)}", flush=True)
            if subprocess.run(["apt-get", "install", "-y", "-q", *packages], env=env).returncode != 0:
                raise BenchError(f"apt-get install -y {' '.join(packages)} failed (see its output above)")
        still = [t for t in ("wrk", "nginx") if _which(t) is None]
        if still:
            raise BenchError(f"still missing after apt-get: {', '.join(still)}")
        print("bench: installed " + ", ".join(f"{t} ({_which(t)})" for t in missing), flush=True)
    tools = {"wrk": _which("wrk"), "nginx": _which("nginx")}
    if _which("haproxy"):
        tools["haproxy"] = _which("haproxy")
    return tools


def _version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0].strip() if text else "?"


# --- processes -------------------------------------------------------------------------------

def _nofile_limit() -> tuple[int, int]:
    """The RLIMIT_NOFILE (soft, hard) we can give children: NOFILE when allowed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if os.geteuid() == 0:
        hard = max(hard, NOFILE)
    want = NOFILE if hard == resource.RLIM_INFINITY else min(NOFILE, hard)
    return max(soft, want), hard


def _raise_nofile() -> None:
    """preexec_fn: a child gets NOFILE open files (or the hard limit when lower)."""
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, _nofile_limit())
    except (ValueError, OSError):
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, what: str, log: Path | list[Path] | None,
               timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    logs = [log] if isinstance(log, Path) else list(log or ())
    tail = "".join(p.read_text(errors="replace")[-1500:] for p in logs if p.exists())
    raise BenchError(f"{what} did not start (exit={proc.poll()}):\n{tail}")


def _wait_log(path: Path, pattern: str, proc: subprocess.Popen, what: str, timeout: float = 20.0) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(pattern, path.read_text(errors="replace"))
        if m:
            return m
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise BenchError(f"{what} did not start (exit={proc.poll()}):\n{path.read_text(errors='replace')[-2000:]}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            kids.setdefault(ppid, []).append(int(entry))
    return kids


def _tree(pid: int) -> list[int]:
    """pid and its descendants (an nginx master and its worker)."""
    kids, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, ()))
    return out


def _cpu_seconds(pids: list[int]) -> tuple[float, float]:
    """(utime, stime) of the processes (all their threads), in seconds."""
    user = system = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        user += int(fields[11])   # fields 14 and 15 of stat(5)
        system += int(fields[12])
    return user / CLK_TCK, system / CLK_TCK


def _rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                m = re.search(r"^VmRSS:\s+(\d+) kB", f.read(), re.M)
        except OSError:
            continue
        total += int(m[1]) if m else 0
    return total


def _set_affinity(pids: list[int], cpu: int) -> dict[int, set[int]]:
    """Move every thread of the processes to one CPU; returns where each thread was
    allowed to run before, for _restore_affinity (an unpinned target stays unpinned)."""
    before = {}
    for pid in pids:
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            continue
        for tid in tids:
            try:
                before[tid] = os.sched_getaffinity(tid)
                os.sched_setaffinity(tid, {cpu})
            except OSError:
                pass
    return before


def _restore_affinity(before: dict[int, set[int]]) -> None:
    for tid, cpus in before.items():
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:   # the thread is gone
            pass


def _open_files_limit(pid: int) -> int:
    with open(f"/proc/{pid}/limits") as f:
        m = re.search(r"^Max open files\s+(\S+)", f.read(), re.M)
    return 1 << 30 if m[1] == "unlimited" else int(m[1])


def _commit(tree: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "--no-optional-locks", "-C", str(tree), "status", "--porcelain",
                                "--untracked-files=no", "--", "proxy", "diagnostics"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except OSError:
        return None
    return out.stdout.strip() + ("+uncommitted(proxy/,diagnostics/)" if dirty else "")


def _env(tree: Path, pure: bool = False) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree)
    env.pop("PYTHONSTARTUP", None)
    env.pop("GATEWISE_PURE", None)
    if pure:
        env["GATEWISE_PURE"] = "1"  # the hot path as plain Python, even where it is built
    return env


def _check_imports(python: str, tree: Path) -> str | None:
    """None when `import proxy, diagnostics` resolves inside tree, else what went wrong."""
    code = ("import os, proxy, diagnostics\n"
            "for m in (proxy, diagnostics): print(os.path.dirname(os.path.abspath(m.__file__)))")
    out = subprocess.run([python, "-c", code], cwd=tree, env=_env(tree), capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        return out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"
    got = [Path(line) for line in out.stdout.split()]
    return None if got == [tree / "proxy", tree / "diagnostics"] else f"resolves to {', '.join(map(str, got))}"


@dataclass
class Target:
    name: str
    kind: str                          # direct | gatewise | nginx | haproxy | floor
    port: int
    proc: subprocess.Popen | None = None
    info: dict | None = None

    def pids(self) -> list[int]:
        return _tree(self.proc.pid) if self.proc else []

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


class Lab:
    """The temp dir, the processes started in it, and how to start each kind."""

    def __init__(self, tools: dict[str, str], python: str, pin: bool, idle: int):
        self.tools, self.python, self.idle = tools, python, idle
        self.proxy_cpu, self.load_cpu = (0, 1) if pin else (None, None)
        self.tmp = Path(tempfile.mkdtemp(prefix="gatewise-bench-"))
        self.tmp.chmod(0o755)          # nginx workers run as nobody when we are root
        self.procs: list[subprocess.Popen] = []
        self.nofile = _nofile_limit()[0]
        self.backend: Target | None = None
        self._n = 0

    def pin(self, cpu: int | None) -> list[str]:
        return ["taskset", "-c", str(cpu)] if cpu is not None else []

    def close(self) -> None:
        for proc in reversed(self.procs):
            _stop(proc)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _spawn(self, cmd: list[str], log: Path, **kw) -> subprocess.Popen:
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    preexec_fn=_raise_nofile, **kw)
        self.procs.append(proc)
        return proc

    def stop(self, target: Target) -> None:
        if target.proc:
            _stop(target.proc)
            self.procs.remove(target.proc)

    # nginx: backend and proxy share the frame

    def _nginx_conf(self, tag: str, events_conns: int, http: str) -> Path:
        base = self.tmp / tag
        base.mkdir(exist_ok=True)
        rlimit = f"worker_rlimit_nofile {self.nofile};" if self.nofile >= events_conns + 64 else ""
        conf = base / "nginx.conf"
        conf.write_text(f"""
worker_processes 1;
daemon off;
pid {base}/nginx.pid;
error_log {base}/error.log warn;
{rlimit}
events {{ worker_connections {events_conns}; }}
http {{
    access_log off;
    default_type text/plain;
    client_body_temp_path {base}/body;
    proxy_temp_path {base}/proxy;
    fastcgi_temp_path {base}/fastcgi;
    uwsgi_temp_path {base}/uwsgi;
    scgi_temp_path {base}/scgi;
    keepalive_requests 1000000;
{http}
}}
""")
        return conf

    def _start_nginx(self, tag: str, conf: Path, port: int, cpu: int | None) -> subprocess.Popen:
        log = self.tmp / tag / "stderr.log"
        proc = self._spawn(self.pin(cpu) + [self.tools["nginx"], "-p", str(self.tmp / tag), "-c", str(conf),
                                            "-e", str(self.tmp / tag / "error.log")], log)
        _wait_port(port, proc, f"nginx ({tag})", [log, self.tmp / tag / "error.log"])
        return proc

    def start_backend(self) -> Target:
        www = self.tmp / "www" / "files"
        www.mkdir(parents=True)
        (www / "16k.bin").write_bytes(os.urandom(16 * 1024))
        (www / "1m.bin").write_bytes(os.urandom(MIB))
        for p in (www.parent, www):
            p.chmod(0o755)
        port = _free_port()
        (www.parent / "ok.txt").write_text("ok\n")
        # POST /upload reads the whole body (into memory) before answering, as an upload
        # endpoint does: `return 200` would answer at once and discard the body afterwards,
        # and a proxy that sees the response before it has sent the body closes the client
        # connection (wrk counts read errors). Stock modules only: the mirror module reads
        # the body first; the static handler then refuses POST, and error_page turns that
        # into 200 "ok\n".
        conf = self._nginx_conf("backend", 4096, f"""
    sendfile on;
    tcp_nopush on;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        client_max_body_size 2m;
        client_body_buffer_size 512k;
        location = / {{ return 200 "hello\\n"; }}
        location = /health {{ return 200 "ok\\n"; }}
        location /files/ {{ root {www.parent}; }}
        location = /upload {{
            mirror /sink;
            mirror_request_body on;
            root {www.parent};
            try_files /ok.txt =404;
            error_page 405 =200 @ok;
        }}
        location = /sink {{ internal; return 204; }}
        location @ok {{ return 200 "ok\\n"; }}
    }}""")
        self.backend = Target("direct", "direct", port, None)
        self._start_nginx("backend", conf, port, self.load_cpu)
        return self.backend

    def start_gatewise(self, name: str, src: Path, workers: int = 1, pure: bool = False) -> Target:
        self._n += 1
        tag = f"gatewise{self._n}"
        (self.tmp / tag).mkdir()
        cfg = self.tmp / tag / "gatewise.toml"
        # The default config (conf/gatewise.toml) with one server: active health checks on,
        # passive checks on, admin listener (metrics, /debug, recorder) on. Ports: any free.
        # max_client_connections is raised from 10,000 so the idle test's 10,000 fit beside
        # anything else; it is a limit, not a feature.
        cfg.write_text(f"""
[listen]
address = "127.0.0.1:0"
workers = {workers}

[admin]
address = "127.0.0.1:0"

[limits]
max_client_connections = {max(20000, self.idle + 4096)}

[pools.app.health]
path = "/health"

[[pools.app.servers]]
url = "http://127.0.0.1:{self.backend.port}"
""")
        log = self.tmp / tag / "stderr.log"
        # workers > 1 is about using more than one core: the supervisor and its workers are
        # not pinned (they share the machine with the backend and wrk)
        pin = self.pin(self.proxy_cpu) if workers == 1 else []
        proc = self._spawn(pin + [self.python, "-m", "proxy", "run", "-c", str(cfg)], log, cwd=src,
                           env=_env(src, pure))
        m = _wait_log(log, r'"event":\s*"listening".*?"address":\s*"127\.0\.0\.1:(\d+)".*?'
                           r'"admin":\s*"127\.0\.0\.1:(\d+)"', proc, name)
        port, admin = int(m[1]), int(m[2])
        hot_path = re.search(r'"hot_path":\s*"([^"]*)"', log.read_text())  # (older trees do not say)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5)
        if metrics.status != 200:
            raise BenchError(f"{name}: admin /metrics answered {metrics.status}")
        return Target(name, "gatewise", port, proc, {"src": str(src), "commit": _commit(src), "admin_port": admin,
                                                    "workers": workers, "config": cfg.read_text(),
                                                    "hot_path": hot_path[1] if hot_path else "plain Python"})

    def start_nginx_proxy(self) -> Target:
        port = _free_port()
        conf = self._nginx_conf("nginx-proxy", max(4096, 2 * self.idle + 1024), f"""
    upstream backend {{
        server 127.0.0.1:{self.backend.port};
        keepalive 32;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        client_max_body_size 2m;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_request_buffering off;    # stream request bodies, as gatewise does
            proxy_max_temp_file_size 0;     # never buffer responses to disk
        }}
    }}""")
        proc = self._start_nginx("nginx-proxy", conf, port, self.proxy_cpu)
        return Target("nginx", "nginx", port, proc, {"config": conf.read_text()})

    def start_haproxy(self) -> Target:
        base = self.tmp / "haproxy"
        base.mkdir(exist_ok=True)
        port = _free_port()
        conf = base / "haproxy.cfg"
        conf.write_text(f"""
global
    nbthread 1
    maxconn {min(max(4096, self.idle + 4096), max(1024, (self.nofile - 256) // 2))}

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 3s
    timeout client 75s
    timeout server 30s
    timeout http-keep-alive 75s

frontend fe
    bind 127.0.0.1:{port}
    default_backend be

backend be
    server s1 127.0.0.1:{self.backend.port}
""")
        log = base / "stderr.log"
        proc = self._spawn(self.pin(self.proxy_cpu) + [self.tools["haproxy"], "-db", "-f", str(conf)], log)
        _wait_port(port, proc, "haproxy", log)
        return Target("haproxy", "haproxy", port, proc, {"config": conf.read_text()})

    def start_floor(self, features: bool = False) -> Target:
        name = "floor+features" if features else "floor"
        base = self.tmp / name
        base.mkdir(exist_ok=True)
        log = base / "stderr.log"
        import floor  # benchmarks/floor.py (here: it imports httptools, uvloop, gatewise)
        # this checkout's gatewise pieces (floor --features uses some), whatever --src says,
        # as plain Python like the rest of the floor
        proc = self._spawn(self.pin(self.proxy_cpu) + floor.command(self.python, self.backend.port, features),
                           log, cwd=ROOT, env=_env(ROOT, pure=True))
        port = int(_wait_log(log, floor.READY, proc, name)[1])
        return Target(name, "floor", port, proc, {"features": features})

    def post_script(self, size: int) -> Path:
        path = self.tmp / f"post-{size}.lua"
        if not path.exists():
            path.write_text(f'wrk.method = "POST"\nwrk.body = string.rep("x", {size})\n'
                            f'wrk.headers["Content-Type"] = "application/octet-stream"\n')
        return path


# --- wrk -------------------------------------------------------------------------------------

_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    return float(m[1]) * _UNIT[m[2]] if m else float("nan")


def run_wrk(lab: Lab, target: Target, sc: Scenario, duration: int) -> dict:
    cmd = lab.pin(lab.load_cpu) + [lab.tools["wrk"], "-t1", f"-c{sc.connections}", f"-d{duration}s", "--latency"]
    if sc.request_bytes:
        cmd += ["-s", str(lab.post_script(sc.request_bytes))]
    cmd.append(target.url(sc.path))
    pids = target.pids()
    moved = _set_affinity(pids, lab.load_cpu) if sc.one_core and target.proc and lab.load_cpu is not None else {}
    try:
        user0, sys0 = _cpu_seconds(pids)
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
        user1, sys1 = _cpu_seconds(pids)
        cpu, system = user1 - user0 + sys1 - sys0, sys1 - sys0
    finally:
        _restore_affinity(moved)
    text = out.stdout
    if out.returncode != 0 or "Requests/sec" not in text:
        raise BenchError(f"wrk failed against {target.name} ({out.returncode}): {text}{out.stderr}")
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", text)
    requests, elapsed = int(m[1]), _ms(m[2] + m[3]) / 1e3
    pct = dict(re.findall(r"^\s+(50|99)(?:\.0+)?%\s+(\S+)", text, re.M))
    errline = (re.search(r"Socket errors:.*", text) or [""])[0]
    kinds = {k: int(n) for k, n in re.findall(r"(connect|read|write|timeout) (\d+)", errline)}
    socket_errors = sum(kinds.values())
    non2xx = int((re.search(r"Non-2xx or 3xx responses: (\d+)", text) or [0, 0])[1])
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text)[1])
    r = {"requests": requests, "seconds": elapsed, "rps": rps,
         "p50_ms": _ms(pct.get("50", "")), "p99_ms": _ms(pct.get("99", "")),
         "socket_errors": socket_errors, "socket_error_kinds": kinds, "non_2xx": non2xx}
    if sc.body_bytes:
        r["mib_s"] = rps * sc.body_bytes / MIB
    if target.proc:
        if target.proc.poll() is not None:
            raise BenchError(f"{target.name} exited during the run (exit {target.proc.returncode})")
        r["cpu_s"] = cpu
        r["sys_s"] = system
        r["cpu_us_per_req"] = cpu / requests * 1e6 if requests else float("nan")
        r["sys_us_per_req"] = system / requests * 1e6 if requests else float("nan")  # the kernel's part
        r["rss_kib"] = _rss_kib(pids)
    return r


def sanity(target: Target, sc: Scenario) -> None:
    """One request of the scenario through the target: the right status and body."""
    url = target.url(sc.path)
    try:
        if sc.request_bytes:
            req = urllib.request.Request(url, data=b"x" * sc.request_bytes, method="POST")
            body = urllib.request.urlopen(req, timeout=10).read()
            ok = body == b"ok\n"
        else:
            body = urllib.request.urlopen(url, timeout=10).read()
            ok = len(body) == sc.response_bytes if sc.response_bytes else body == b"hello\n"
    except OSError as exc:
        raise BenchError(f"{target.name}: {sc.title} failed: {exc}") from None
    if not ok:
        raise BenchError(f"{target.name}: {sc.title}: unexpected body ({len(body)} bytes: {body[:60]!r})")


# --- idle keep-alive connections ---------------------------------------------------------------

async def _open_idle(port: int, n: int, concurrency: int = 100) -> list:
    sem = asyncio.Semaphore(concurrency)
    conns: list = []
    request = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"

    async def one() -> None:
        async with sem:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            conns.append(writer)
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            m = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
            if not head.startswith(b"HTTP/1.1 200") or not m:
                raise BenchError(f"idle connection: unexpected response {head[:80]!r}")
            await reader.readexactly(int(m[1]))

    results = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        for w in conns:
            w.close()
        raise BenchError(f"idle connections: {len(errors)} of {n} failed, first: {errors[0]!r}")
    return conns


def idle_connections(lab: Lab, target: Target, n: int) -> dict:
    """RSS of target before and with n idle keep-alive client connections (each made one request)."""
    pids = target.pids()
    if min(_open_files_limit(p) for p in pids) < n + 512:
        return {"skipped": f"{target.name} may open only {min(_open_files_limit(p) for p in pids)} files"}
    for _ in range(200):                  # warm: pools, buffers, first-request allocations
        urllib.request.urlopen(target.url("/"), timeout=5).read()
    time.sleep(0.3)
    before = _rss_kib(pids)
    affinity = os.sched_getaffinity(0)
    if lab.load_cpu is not None:
        os.sched_setaffinity(0, {lab.load_cpu})
    loop = asyncio.new_event_loop()
    try:
        t0 = time.monotonic()
        conns = loop.run_until_complete(_open_idle(target.port, n))
        opened_s = time.monotonic() - t0
        time.sleep(1.0)
        with_conns = _rss_kib(pids)
        for w in conns:
            w.close()
        loop.run_until_complete(asyncio.sleep(0.2))
    finally:
        loop.close()
        os.sched_setaffinity(0, affinity)
    time.sleep(1.0)
    after = _rss_kib(pids)
    return {"connections": n, "rss_before_kib": before, "rss_with_kib": with_conns, "rss_after_close_kib": after,
            "kib_per_connection": (with_conns - before) / n, "open_seconds": round(opened_s, 2)}


def _raise_client_nofile(n: int) -> str | None:
    want = n + 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return None
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want) if hard != resource.RLIM_INFINITY else hard))
    except (ValueError, OSError) as exc:
        return f"cannot raise this process's open-files limit to {want} (soft {soft}, hard {hard}): {exc}"
    return None


# --- report ----------------------------------------------------------------------------------

def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or x != x else format(x, spec)


def summarize(runs: list[dict], scenarios: list[Scenario], names: list[str]) -> dict:
    out: dict = {}
    for sc in scenarios:
        rows: dict = {}
        for name in names:
            rs = [r for r in runs if r["scenario"] == sc.name and r["target"] == name]
            if not rs:
                continue
            row = {k: statistics.median(r[k] for r in rs)
                   for k in ("rps", "p50_ms", "p99_ms", "cpu_us_per_req", "sys_us_per_req", "mib_s") if k in rs[0]}
            row["errors"] = sum(r["socket_errors"] + r["non_2xx"] for r in rs)
            row["runs"] = len(rs)
            rows[name] = row
        for row in rows.values():
            for ref in ("nginx", "direct"):
                if ref in rows:
                    row[f"rps_vs_{ref}"] = row["rps"] / rows[ref]["rps"]
            if "nginx" in rows and "cpu_us_per_req" in row:
                row["cpu_vs_nginx"] = row["cpu_us_per_req"] / rows["nginx"]["cpu_us_per_req"]
        out[sc.name] = rows
    return out


def table(summary: dict, scenarios: list[Scenario], names: list[str]) -> list[str]:
    lines = ["| scenario | target | req/s | x nginx | x direct | p50 ms | p99 ms | CPU us/req | of it kernel "
             "| CPU x nginx | MiB/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for sc in scenarios:
        for name in names:
            row = summary[sc.name].get(name)
            if row is None:
                continue
            lines.append(f"| {sc.title} | {name} | {row['rps']:,.0f} | {_fmt(row.get('rps_vs_nginx'), '.2f')} "
                         f"| {_fmt(row.get('rps_vs_direct'), '.2f')} | {row['p50_ms']:.3f} | {row['p99_ms']:.3f} "
                         f"| {_fmt(row.get('cpu_us_per_req'), '.1f')} | {_fmt(row.get('sys_us_per_req'), '.1f')} "
                         f"| {_fmt(row.get('cpu_vs_nginx'), '.2f')} "
                         f"| {_fmt(row.get('mib_s'), ',.0f')} |")
    return lines


def added_latency(summary: dict, proxies: list[str]) -> dict:
    c1 = summary.get("get_c1", {})
    if "direct" not in c1:
        return {}
    out = {name: (c1[name]["p50_ms"] - c1["direct"]["p50_ms"]) * 1e3 for name in proxies if name in c1}
    base = out.get("nginx")
    if base is not None and base <= 0:
        base = None
    return {name: {"us": us, "vs_nginx": us / base if base is not None else None} for name, us in out.items()}


def targets_check(summary: dict, added: dict, rss: dict, idle: dict, name: str) -> list[str]:
    """Issue 5's targets for one gatewise column."""
    lines = []

    def ratio(sc: str, key: str) -> float | None:
        return summary.get(sc, {}).get(name, {}).get(key)

    def line(what: str, got: float | None, op: str, want: float, unit: str = "x nginx") -> None:
        if got is None:
            return
        ok = got <= want if op == "<=" else got >= want
        lines.append(f"- {what}: {got:.2f} {unit} (target {op} {want:g}): {'met' if ok else 'MISSED'}")

    line("CPU/request, GET / c50", ratio("get_c50", "cpu_vs_nginx"), "<=", 1.3)
    line("req/s, GET / c50", ratio("get_c50", "rps_vs_nginx"), ">=", 0.75)
    line("req/s, GET / c256", ratio("get_c256", "rps_vs_nginx"), ">=", 1.0)
    if name in added and added[name]["vs_nginx"] is not None:
        line("added latency at c1", added[name]["vs_nginx"], "<=", 1.5)
    g1m, n1m = ratio("get_1m_c50", "mib_s"), summary.get("get_1m_c50", {}).get("nginx", {}).get("mib_s")
    if g1m and n1m:
        line("MiB/s, GET 1 MiB c50", g1m / n1m, ">=", 1.0)
    if name in rss:
        # Flat: no growth from the end of the first repetition (every scenario has run once,
        # buffers and pools have their working size) to the end; with one repetition, from
        # the warm-up on (so the first body scenarios count as growth).
        r = rss[name]
        base = r.get("after_rep1_kib", r["start_kib"])
        growth = r["end_kib"] - base
        since = "after repetition 1" if "after_rep1_kib" in r else "after warm-up"
        verdict = ("flat" if growth <= max(2048, base * 0.05) else "GREW") if "after_rep1_kib" in r else \
            "not judged with one repetition (includes the first use of body buffers)"
        lines.append(f"- RSS: {base / 1024:.1f} MiB {since} -> {r['end_kib'] / 1024:.1f} MiB at the end "
                     f"({growth / 1024:+.1f}): {verdict}")
    if name in idle and "kib_per_connection" in idle[name]:
        kib = idle[name]["kib_per_connection"]
        lines.append(f"- idle keep-alive connections: {kib:.1f} KiB each (aim <= 8): {'met' if kib <= 8 else 'MISSED'}")
    return lines


# --- main ------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run of about a minute: 1 x 1 s per run, no per-scenario warm-up")
    p.add_argument("--duration", type=int, help="whole seconds per measured wrk run (full 10, quick 1)")
    p.add_argument("--repeat", type=int, help="interleaved repetitions; medians are reported (full 3, quick 1)")
    p.add_argument("--warmup", type=int,
                   help="seconds of wrk per target before a scenario's first measured run (full 2, quick 0); "
                        "every target also gets 1 s of GET / c50 after it starts")
    p.add_argument("--scenario", action="append", choices=[s.name for s in SCENARIOS],
                   help="run only this scenario (repeatable; default: all)")
    p.add_argument("--targets", default=",".join(TARGETS),
                   help=f"comma-separated subset of {','.join(TARGETS)} (default: all; gatewise-py is "
                        "gatewise as plain Python (GATEWISE_PURE=1); gatewise-w2 is gatewise with listen.workers = 2, not pinned; haproxy "
                        "only when installed; floor is benchmarks/floor.py, a featureless Python forwarder, and "
                        "floor+features the same with gatewise's per-request feature work inline)")
    p.add_argument("--src", action="append", type=Path, metavar="DIR",
                   help="run gatewise from this tree (repeatable; default: this checkout)")
    p.add_argument("--idle", type=int, default=10000,
                   help="idle keep-alive client connections per proxy for the RSS measurement (0: skip)")
    p.add_argument("--python", default=sys.executable, help="interpreter for gatewise (default: this one)")
    p.add_argument("--no-pin", action="store_true", help="do not use taskset")
    p.add_argument("--no-install", action="store_true", help="never run apt-get")
    p.add_argument("--json", type=Path, metavar="FILE",
                   help="where to write the JSON results (default: benchmarks/results/<timestamp>.json)")
    args = p.parse_args(argv)
    duration = args.duration or (1 if args.quick else 10)
    repeat = args.repeat or (1 if args.quick else 3)
    warmup = args.warmup if args.warmup is not None else (0 if args.quick else 2)
    scenarios = [s for s in SCENARIOS if not args.scenario or s.name in args.scenario]
    wanted = {t.strip() for t in args.targets.split(",") if t.strip()}
    unknown = wanted - set(TARGETS)
    if unknown:
        p.error(f"--targets: unknown {', '.join(sorted(unknown))}")

    try:
        tools = ensure_tools(not args.no_install)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    if "haproxy" in wanted and "haproxy" not in tools:
        print("bench: haproxy is not installed; its column is skipped (this script never installs it)",
              file=sys.stderr)
    srcs = [s.resolve() for s in (args.src or [ROOT])] if wanted & set(GATEWISE_TARGETS) else []
    for tree in dict.fromkeys(srcs):
        problem = _check_imports(args.python, tree)
        if problem:
            print(f"bench: `import proxy, diagnostics` in {tree}: {problem}", file=sys.stderr)
            return 2
    gw_names = (["gatewise"] if len(srcs) == 1 else
                [f"gatewise:{s.name}" if len({x.name for x in srcs}) == len(srcs) else f"gatewise:{i + 1}"
                 for i, s in enumerate(srcs)])
    pin = not args.no_pin and shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    idle_n = args.idle
    idle_problem = _raise_client_nofile(idle_n) if idle_n else None

    started = time.monotonic()
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    cmdline = " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:]))
    results: dict = {
        "command": cmdline, "mode": "quick" if args.quick else "full", "started": stamp,
        "commit": _commit(ROOT), "duration": duration, "repeat": repeat, "warmup": warmup,
        "pinned": pin, "layout": ("proxy on CPU 0, backend and wrk -t1 on CPU 1; GET / c1: all three on CPU 1"
                                  if pin else "not pinned"),
        "cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release(),
        "wrk": _version([tools["wrk"], "-v"]), "nginx": _version([tools["nginx"], "-v"]),
        "haproxy": _version([tools["haproxy"], "-v"]) if "haproxy" in tools else None,
        "scenarios": [s.__dict__ for s in scenarios], "targets": {}, "runs": [],
    }
    lab = Lab(tools, args.python, pin, idle_n)
    # How to start each proxy column, in table order (again, fresh, for the idle measurement)
    starters: dict = {}
    if "gatewise" in wanted:
        for name, src in zip(gw_names, srcs):
            starters[name] = functools.partial(lab.start_gatewise, name, src)
    if "gatewise-py" in wanted:
        starters["gatewise-py"] = functools.partial(lab.start_gatewise, "gatewise-py", srcs[-1], pure=True)
    if "gatewise-w2" in wanted:
        starters["gatewise-w2"] = functools.partial(lab.start_gatewise, "gatewise-w2", srcs[-1], workers=2)
    if "nginx" in wanted:
        starters["nginx"] = lab.start_nginx_proxy
    if "haproxy" in wanted and "haproxy" in tools:
        starters["haproxy"] = lab.start_haproxy
    if "floor" in wanted:
        starters["floor"] = lab.start_floor
    if "floor+features" in wanted:
        starters["floor+features"] = functools.partial(lab.start_floor, features=True)
    targets: list[Target] = []
    rss: dict = {}
    idle: dict = {}
    try:
        backend = lab.start_backend()
        if "direct" in wanted:
            targets.append(backend)
        for name, start in starters.items():
            try:
                targets.append(start())
            except BenchError as exc:
                if name != "haproxy":
                    raise
                print(f"bench: skipping haproxy: {exc}", file=sys.stderr)  # optional: go on without it
        if not targets:
            raise BenchError("no targets to run")
        for t in targets:
            results["targets"][t.name] = {"kind": t.kind, "port": t.port, **(t.info or {})}
        names = [t.name for t in targets]
        proxies = [t for t in targets if t.proc]
        print(f"bench: {results['mode']} run, {repeat} x {duration} s per scenario and target; "
              f"{results['layout']}; targets: {', '.join(names)}", file=sys.stderr, flush=True)

        for t in targets:               # sanity, then a first warm-up
            for sc in scenarios:
                sanity(t, sc)
            run_wrk(lab, t, BY_NAME["get_c50"], 1)
        for t in proxies:
            rss[t.name] = {"start_kib": _rss_kib(t.pids())}
            rss[t.name]["max_kib"] = rss[t.name]["start_kib"]

        total = repeat * len(scenarios) * len(targets)
        done = 0
        for rep in range(repeat):
            for sc in scenarios:
                if rep == 0 and warmup > 0:
                    for t in targets:
                        run_wrk(lab, t, sc, warmup)
                for t in targets:
                    r = run_wrk(lab, t, sc, duration)
                    r.update(scenario=sc.name, target=t.name, rep=rep)
                    results["runs"].append(r)
                    done += 1
                    if "rss_kib" in r:
                        rss[t.name]["max_kib"] = max(rss[t.name]["max_kib"], r["rss_kib"])
                    print(f"  [{done}/{total}] rep {rep + 1} {sc.title:16} {t.name:>10}: {r['rps']:10,.0f} req/s"
                          + (f"  {r['cpu_us_per_req']:6.1f} us/req (kernel {r['sys_us_per_req']:4.1f})"
                             if "cpu_us_per_req" in r else "")
                          + (f"  {r['mib_s']:7,.0f} MiB/s" if "mib_s" in r else "")
                          + (f"  ERRORS socket={r['socket_errors']} {r['socket_error_kinds']} non2xx={r['non_2xx']}"
                             if r["socket_errors"] or r["non_2xx"] else ""), file=sys.stderr, flush=True)
            if rep == 0 and repeat > 1:
                for t in proxies:
                    rss[t.name]["after_rep1_kib"] = _rss_kib(t.pids())
        for t in proxies:
            rss[t.name]["end_kib"] = _rss_kib(t.pids())
        load_seconds = time.monotonic() - started

        # idle keep-alive connections: fresh proxies, one at a time (not the floor: it opens
        # an upstream connection per client connection, more than the backend accepts)
        if idle_n and idle_problem:
            idle["skipped"] = idle_problem
        elif idle_n:
            for t in proxies:
                lab.stop(t)
            for start in [starters[t.name] for t in proxies if t.kind != "floor"]:
                t = start()
                print(f"  idle: {idle_n:,} keep-alive connections to a fresh {t.name}", file=sys.stderr, flush=True)
                try:
                    idle[t.name] = idle_connections(lab, t, idle_n)
                except BenchError as exc:
                    idle[t.name] = {"skipped": str(exc)}
                lab.stop(t)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        lab.close()

    proxy_names = [n for n in names if n != "direct"]
    summary = summarize(results["runs"], scenarios, names)
    added = added_latency(summary, proxy_names)
    errors = sum(r["socket_errors"] + r["non_2xx"] for r in results["runs"])
    results.update(median=summary, added_latency_c1=added, rss=rss, idle=idle, errors=errors,
                   load_seconds=round(load_seconds, 1), total_seconds=round(time.monotonic() - started, 1))

    out: list[str] = []
    out.append(f"\ngatewise {results['commit'] or '?'}; {results['layout']}; wrk -t1; medians of {repeat} "
               f"interleaved x {duration} s runs ({results['mode']} mode)")
    for t in targets:
        if t.kind == "gatewise" and len(gw_names) > 1:
            out.append(f"  {t.name}: {t.info['src']} @ {t.info['commit'] or '?'}")
    out.append("")
    out.extend(table(summary, scenarios, names))
    out.append("")
    if added:
        out.append("Added latency at c1 (p50 - direct p50): " + "; ".join(
            f"{n} {a['us']:.0f} us" + (f" ({a['vs_nginx']:.2f}x nginx)" if a["vs_nginx"] is not None and n != "nginx" else "")
            for n, a in added.items()))
    if rss:
        out.append("RSS of the proxies (after warm-up" + (" -> after repetition 1" if repeat > 1 else "")
                   + " -> end, max): " + "; ".join(
            f"{n} {r['start_kib'] / 1024:.1f}" + (f" -> {r['after_rep1_kib'] / 1024:.1f}" if "after_rep1_kib" in r else "")
            + f" -> {r['end_kib'] / 1024:.1f} MiB (max {r['max_kib'] / 1024:.1f})" for n, r in rss.items()))
    if idle.get("skipped"):
        out.append(f"Idle connections: skipped: {idle['skipped']}")
    elif idle:
        parts = []
        for n, r in idle.items():
            if "skipped" in r:
                parts.append(f"{n} skipped ({r['skipped']})")
            else:
                parts.append(f"{n} {r['kib_per_connection']:.1f} KiB/connection ({r['rss_before_kib'] / 1024:.1f} -> "
                             f"{r['rss_with_kib'] / 1024:.1f} MiB; {r['rss_after_close_kib'] / 1024:.1f} after closing)")
        out.append(f"Idle keep-alive connections ({idle_n:,}, one request each): " + "; ".join(parts))
    for n in [t.name for t in targets if t.kind in ("gatewise", "floor")]:
        if "nginx" in names or n in rss:
            check = targets_check(summary, added, rss, idle, n)
            if check:
                out.append(f"\nIssue 5 targets ({n}):")
                out.extend(check)
    if errors:
        out.append(f"\nWARNING: {errors} socket errors / non-2xx responses across the runs (see the JSON)")
    out.append(f"\nload runs took {load_seconds:.0f} s, everything {results['total_seconds']:.0f} s")

    path = args.json or RESULTS / f"{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    out.append(f"results: {path}")
    print("\n".join(out), flush=True)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
