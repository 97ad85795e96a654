"""Instructions per request on the hot path, counted by valgrind's callgrind.

    .venv/bin/python benchmarks/profile.py [--connections 10] [--requests 200] [--src DIR]
                                           [--target gatewise|floor|floor+features] [--ablate NAMES]

Wall-clock figures on a shared 2-core VM move by 10% between runs; instruction counts
do not (about ±0.1% here), so this is how a hot-path change is judged before `make
bench` confirms it. It measures user space only: the kernel's share (recv/send,
epoll) is invisible to callgrind; `bench.py`'s CPU µs/request includes it.

1. starts a backend (`gatewise faults --mode ok`, not under valgrind);
2. starts gatewise under `valgrind --tool=callgrind --instr-atstart=no` with the
   default features except active health checks (a probe every 2 s would land in the
   count at random), on free loopback ports;
3. warms up with 5 requests per connection, switches instrumentation on, sends
   `--connections` keep-alive connections x `--requests` GET / (each connection one
   request at a time, all of them interleaved), switches it off and dumps;
4. prints Ir (instructions) per request, and where the callgrind file is, for
   `callgrind_annotate FILE` (`--inclusive=yes` for the call tree).

gatewise runs as built (compiled by mypyc: setup.py); `--pure` counts its plain-Python
hot path (GATEWISE_PURE=1). `--target floor` and `--target floor+features` count
benchmarks/floor.py instead (without and with `--features`, plain Python), the same way:
the reference points for gatewise's count.
`--ablate stats,timers,...` stubs components out first (benchmarks/ablate/sitecustomize.py
lists them): the drop in the count is what they cost.

Needs valgrind (Debian: `apt-get install valgrind`). Loopback only; every process it
starts is stopped.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ABLATE_STUBS = ROOT / "benchmarks" / "ablate" / "sitecustomize.py"  # its NAMES are the --ablate choices
REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: profile\r\nAccept: */*\r\n\r\n"
BODY = b"hello\n"


def _wait(pattern: str, path: Path, proc: subprocess.Popen, timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(pattern, path.read_text(errors="replace")) if path.exists() else None
        if m:
            return m
        if proc.poll() is not None:
            raise SystemExit(f"exited {proc.returncode} before {pattern!r}:\n{path.read_text()[-2000:]}")
        time.sleep(0.1)  # polling a log file
    raise SystemExit(f"no {pattern!r} within {timeout:g} s:\n{path.read_text()[-2000:]}")


def load(socks: list[socket.socket], requests: int) -> None:
    """`requests` GETs on each of the open keep-alive connections `socks`, one in flight per
    connection; returns when every response has arrived (the connections stay open, so
    the counted window holds requests only: no accept, no connect, no close)."""
    sel = selectors.DefaultSelector()
    left: dict[socket.socket, list] = {}
    for s in socks:
        left[s] = [requests, b""]
        s.send(REQUEST)
        sel.register(s, selectors.EVENT_READ)
    while sel.get_map():
        events = sel.select(30)
        if not events:
            raise SystemExit("no response for 30 s")
        for key, _ in events:
            s = key.fileobj
            state = left[s]
            data = s.recv(65536)
            if not data:
                raise SystemExit("the proxy closed a connection")
            state[1] += data
            while BODY in state[1]:  # the body ends each response; heads never contain it
                state[1] = state[1][state[1].index(BODY) + len(BODY):]
                state[0] -= 1
                if state[0] == 0:
                    sel.unregister(s)
                    break
                s.send(REQUEST)
    sel.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--connections", type=int, default=10)
    p.add_argument("--requests", type=int, default=200, help="per connection")
    p.add_argument("--src", type=Path, default=ROOT, help="the gatewise tree to measure")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--target", choices=("gatewise", "floor", "floor+features"), default="gatewise")
    p.add_argument("--ablate", default="", metavar="NAMES",
                   help="comma-separated components to stub out (benchmarks/ablate/sitecustomize.py); "
                        "implies --pure (a stub cannot replace what compiled code calls directly)")
    p.add_argument("--pure", action="store_true",
                   help="gatewise's hot path as plain Python (GATEWISE_PURE=1), not compiled")
    args = p.parse_args(argv)
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            print(f"profile: {tool} not found (Debian: apt-get install valgrind)", file=sys.stderr)
            return 2
    src = args.src.resolve()
    env = {**os.environ, "PYTHONPATH": str(src), "PYTHONHASHSEED": "0"}
    env.pop("GATEWISE_PURE", None)
    # The floor is plain Python whatever is built, as in bench.py
    gw_env = {**env, "GATEWISE_PURE": "1"} if args.pure or args.ablate or args.target != "gatewise" else env
    if args.ablate:
        if args.target != "gatewise":
            p.error("--ablate applies to --target gatewise only")
        names = ast.literal_eval(re.search(r"^NAMES = (\(.*?\))$", ABLATE_STUBS.read_text(), re.M)[1])
        unknown = set(args.ablate.split(",")) - set(names)
        if unknown:
            p.error(f"--ablate: {', '.join(sorted(unknown))} not in {', '.join(names)} ({ABLATE_STUBS})")
        gw_env = {**gw_env, "PYTHONPATH": f"{ABLATE_STUBS.parent}{os.pathsep}{src}",
                  "ABLATE": args.ablate}
    tmp = Path(tempfile.mkdtemp(prefix="gatewise-profile-"))
    procs: list[subprocess.Popen] = []
    try:
        backend_log = tmp / "backend.log"
        backend = subprocess.Popen([args.python, "-m", "proxy", "faults", "--listen", "127.0.0.1:0", "--mode", "ok"],
                                   cwd=src, env=env, stdout=backend_log.open("wb"), stderr=subprocess.STDOUT)
        procs.append(backend)
        backend_port = int(_wait(r"127\.0\.0\.1:(\d+)", backend_log, backend, 15)[1])
        cfg = tmp / "gatewise.toml"
        cfg.write_text(f'[listen]\naddress = "127.0.0.1:0"\n[admin]\naddress = "127.0.0.1:0"\n'
                       f'[[pools.app.servers]]\nurl = "http://127.0.0.1:{backend_port}"\n')
        out = tmp / "callgrind.out"
        log = tmp / "gatewise.log"
        if args.target == "gatewise":
            cmd, ready = [args.python, "-m", "proxy", "run", "-c", str(cfg)], r'"event":"listening","address":"127\.0\.0\.1:(\d+)"'
        else:
            import floor  # benchmarks/floor.py (here: it imports httptools, uvloop, gatewise)
            cmd, ready = floor.command(args.python, backend_port, args.target != "floor"), floor.READY
        gw = subprocess.Popen(["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
                               *cmd], cwd=src, env=gw_env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
        procs.append(gw)
        port = int(_wait(ready, log, gw, 120)[1])  # Python under valgrind starts slowly
        socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(args.connections)]
        for s in socks:
            s.setblocking(False)
        load(socks, 5)  # warm-up: pooled upstream connections, learned header names
        subprocess.run(["callgrind_control", "-i", "on", str(gw.pid)], check=True, capture_output=True)
        load(socks, args.requests)
        subprocess.run(["callgrind_control", "-i", "off", str(gw.pid)], check=True, capture_output=True)
        for s in socks:
            s.close()
        subprocess.run(["callgrind_control", "-d", str(gw.pid)], check=True, capture_output=True)
        dumps = list(tmp.glob("callgrind.out*"))
        totals = [int(m[1]) for f in dumps if (m := re.search(r"^totals:\s+(\d+)", f.read_text(), re.M))]
        if not totals:
            raise SystemExit(f"no callgrind totals in {tmp}")
        n = args.connections * args.requests
        detail = f", without {args.ablate}" if args.ablate else ""
        hot = re.search(r'"hot_path":\s*"([^"]*)"', log.read_text()) if args.target == "gatewise" else None
        detail += f", hot path {hot[1]}" if hot else ""
        print(f"{max(totals) / n:,.0f} instructions per request ({args.target}{detail}, {args.connections} "
              f"connections x {args.requests} GET /, {src})")
        print(f"callgrind file: {max(dumps, key=lambda f: f.stat().st_size)}")
        return 0
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


if __name__ == "__main__":
    raise SystemExit(main())
