"""Python bytecodes per request, per function, on the hot path of the running proxy.

    .venv/bin/python benchmarks/bytecodes.py [--connections 10] [--requests 100] [--top 40]

It counts the plain-Python hot path (GATEWISE_PURE=1: the compiled build runs no
bytecodes). profile.py counts the machine instructions of a request but cannot say which Python
function spent them (CPython 3.11's frames are invisible to callgrind). This counts the
other way round: every bytecode the interpreter executes for gatewise, attributed to
its function, through `sys.settrace` with opcode events. Repeatable like profile.py
(within about 0.5%: how requests land per loop pass decides whether the Outbox holds a
write), and about 45 machine
instructions per bytecode on this stack, so the two read together: profile.py says how
much, this says where. Calls into C (httptools, uvloop, builtins) count as the one
bytecode that calls them.

1. starts a backend (`gatewise faults --mode ok`, a subprocess);
2. runs gatewise in this process (uvloop, the default config without active health
   checks, as profile.py) on free loopback ports;
3. a client thread (not traced: settrace is per thread) opens `--connections` keep-alive
   connections and sends what profile.py sends (its load()): 5 requests each to warm up,
   then, counted, `--requests` GET / on each, one at a time per connection, all of them
   interleaved;
4. prints bytecodes and Python calls per request, then the functions that run at least
   one bytecode per request, most first.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import importlib.util
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Bytecodes exist only where the hot path runs as Python: never load the compiled build
# here (set before anything imports proxy).
os.environ["GATEWISE_PURE"] = "1"


def _profile_module():
    """benchmarks/profile.py, for its load(): the same requests in the same rhythm as
    the instruction count, so the two figures read together. (Loaded by path: the name
    `profile` is also the standard library's.)"""
    spec = importlib.util.spec_from_file_location("gatewise_profile", ROOT / "benchmarks" / "profile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _client(port: int, connections: int, requests: int, on, off) -> None:
    """profile.load's warm-up (5 requests per connection), `on()`, the counted requests,
    `off()`, then the sockets are closed (outside the counted window)."""
    load = _profile_module().load
    socks = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(connections)]
    try:
        for s in socks:
            s.setblocking(False)
        load(socks, 5)
        on()
        load(socks, requests)
    finally:
        off()
        for s in socks:
            s.close()


class Counter:
    """A settrace tracer: bytecodes and calls per function (file:name)."""

    def __init__(self) -> None:
        self.ops: collections.Counter[str] = collections.Counter()
        self.calls: collections.Counter[str] = collections.Counter()

    def __call__(self, frame, event, arg):
        code = frame.f_code
        key = f"{os.path.relpath(code.co_filename, ROOT)}:{code.co_name}"
        self.calls[key] += 1
        frame.f_trace_opcodes = True
        ops = self.ops

        def local(frame, event, arg):
            if event == "opcode":
                ops[key] += 1
            return local
        return local


async def _trace(counter: Counter | None) -> None:
    sys.settrace(counter)


async def _run(args) -> Counter:
    from proxy.config import config_from_urls
    from proxy.server import Server

    backend = subprocess.Popen([sys.executable, "-m", "proxy", "faults", "--listen", "127.0.0.1:0",
                                "--mode", "ok"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        line = backend.stdout.readline().decode()
        m = re.search(r"127\.0\.0\.1:(\d+)", line)
        if m is None:
            raise SystemExit(f"backend did not start: {line!r}")
        cfg = config_from_urls([f"http://127.0.0.1:{m[1]}"], listen="127.0.0.1:0", admin="127.0.0.1:0")
        server = await Server(cfg).start()
        try:
            counter = Counter()
            loop = asyncio.get_running_loop()

            def switch(tracer: Counter | None) -> None:
                # from the client's thread, on the loop's (settrace is per thread), and
                # waited for: the counted window holds the counted requests and nothing else
                asyncio.run_coroutine_threadsafe(_trace(tracer), loop).result(30)

            try:
                await asyncio.wait_for(loop.run_in_executor(
                    None, _client, server.port, args.connections, args.requests,
                    lambda: switch(counter), lambda: switch(None)), 120)
            finally:
                sys.settrace(None)
        finally:
            await server.stop(0)
    finally:
        backend.terminate()
        backend.wait(10)
    return counter


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--connections", type=int, default=10)
    p.add_argument("--requests", type=int, default=100, help="per connection")
    p.add_argument("--top", type=int, default=40, help="functions to list")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import uvloop

    counter = uvloop.run(_run(args))
    n = args.connections * args.requests
    ops, calls = counter.ops, counter.calls
    print(f"{sum(ops.values()) / n:,.0f} bytecodes and {sum(calls.values()) / n:.1f} Python calls per request "
          f"({args.connections} connections x {args.requests} GET /, {ROOT})")
    print(f"{'bytecodes':>10} {'calls':>6}  function (per request)")
    for key, count in sorted(ops.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"{count / n:10.1f} {calls.get(key, 0) / n:6.2f}  {key}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
