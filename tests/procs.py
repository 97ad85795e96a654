"""Run gatewise as a real subprocess, for tests that need a process: its RSS
(/proc/<pid>/status), its signals, its exit code and its stderr log.

- `ProxyProc.start(args)`: `python -m proxy <args>`; `wait_listening()` reads the JSON
  `{"event": "listening", "address": "127.0.0.1:PORT"}` line from stderr with a deadline.
- `FaultProc.start(mode)`: `python -m proxy faults --listen 127.0.0.1:0 --mode MODE`; the port
  is read from the line it prints on stdout.
- stderr is read continuously by a task (the child never blocks on a full pipe); every line
  is kept in `.lines`, JSON ones also in `.events`. Waits are on lines or on exit, each with
  a deadline; nothing sleeps to synchronise.
- `close()` kills what is still running and reaps it: call it in teardown (the fixtures in
  the test modules do).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from pathlib import Path

import pytest

from proxy.config import to_toml

ROOT = Path(__file__).resolve().parent.parent


def vm_rss_kib(pid: int) -> int:
    """Resident set size of a live process, in KiB (Linux /proc)."""
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def proc_stat(pid: int) -> list[bytes] | None:
    """The fields of /proc/<pid>/stat after "(comm)" (state, ppid, ...), or None when the
    process is gone. comm may contain spaces and parentheses: split after the last ")"."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def children(ppid: int) -> list[int]:
    """Pids of the live processes whose parent is ppid (Linux /proc)."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := proc_stat(int(entry))) is not None and int(stat[1]) == ppid:
            kids.append(int(entry))
    return kids


def cmdline(pid: int) -> list[bytes]:
    """A process's argv ([] once it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")
    except (FileNotFoundError, ProcessLookupError):
        return []


def caught_signals(pid: int) -> set[int]:
    """Signals the process has a handler for (SigCgt in /proc/<pid>/status)."""
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"SigCgt:"):
                mask = int(line.split()[1], 16)
                return {n for n in range(1, 65) if mask >> (n - 1) & 1}
    raise RuntimeError(f"no SigCgt for pid {pid}")


class _Child:
    """A child process whose stdout/stderr lines are collected as they arrive."""

    def __init__(self, proc: asyncio.subprocess.Process, label: str) -> None:
        self.proc = proc
        self.label = label
        self.lines: list[str] = []          # stderr
        self.out_lines: list[str] = []      # stdout
        self.events: list[dict] = []        # stderr lines that parse as JSON objects
        self._changed = asyncio.Event()
        self._readers = [asyncio.create_task(self._read(proc.stderr, self.lines, True))]
        if proc.stdout is not None:
            self._readers.append(asyncio.create_task(self._read(proc.stdout, self.out_lines, False)))

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    async def _read(self, stream: asyncio.StreamReader, into: list[str], parse: bool) -> None:
        while True:
            raw = await stream.readline()
            if not raw:
                break
            line = raw.decode("utf-8", "replace").rstrip("\n")
            into.append(line)
            if parse:
                try:
                    obj = json.loads(line)
                except ValueError:
                    obj = None
                if isinstance(obj, dict):
                    self.events.append(obj)
            self._changed.set()
        self._changed.set()

    async def _wait_for(self, found, what: str, timeout: float):
        """Wait until found() returns something truthy; fail on timeout or early exit."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            self._changed.clear()
            result = found()
            if result:
                return result
            if self.proc.returncode is not None and all(r.done() for r in self._readers):
                raise AssertionError(f"{self.label} exited {self.proc.returncode} before {what}; "
                                     f"stderr:\n" + "\n".join(self.lines[-40:]))
            left = deadline - loop.time()
            if left <= 0:
                raise AssertionError(f"{self.label}: no {what} within {timeout} s; stderr:\n"
                                     + "\n".join(self.lines[-40:]))
            waiters = [asyncio.ensure_future(self._changed.wait()),
                       asyncio.ensure_future(self.proc.wait())]
            try:
                await asyncio.wait(waiters, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()

    async def wait_event(self, event: str, timeout: float = 10.0) -> dict:
        """The first JSON stderr line with this "event"."""
        def found():
            return next((e for e in self.events if e.get("event") == event), None)
        return await self._wait_for(found, f'"event": "{event}" line', timeout)

    async def wait_count(self, event: str, n: int, timeout: float = 10.0) -> list[dict]:
        """At least n JSON stderr lines with this "event"."""
        def found():
            hits = [e for e in self.events if e.get("event") == event]
            return hits if len(hits) >= n else None
        return await self._wait_for(found, f'{n} "{event}" lines', timeout)

    async def wait_stdout(self, pattern: str, timeout: float = 10.0) -> re.Match:
        rx = re.compile(pattern)
        def found():
            return next((m for line in self.out_lines if (m := rx.search(line))), None)
        return await self._wait_for(found, f"stdout matching {pattern!r}", timeout)

    async def wait_exit(self, timeout: float) -> int:
        """The exit code, once the process is gone and its output fully read."""
        async with asyncio.timeout(timeout):
            code = await self.proc.wait()
            await asyncio.gather(*self._readers, return_exceptions=True)
        return code

    async def wait_handles(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Poll (with a deadline) until the process has installed a handler for `sig`: a
        signal sent before that gets the default action (SIGTERM kills outright)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self.proc.returncode is not None:
                raise AssertionError(f"{self.label} exited {self.proc.returncode} before handling "
                                     f"{signal.Signals(sig).name}")
            if sig in caught_signals(self.pid):
                return
            if loop.time() > deadline:
                raise AssertionError(f"{self.label}: no handler for {signal.Signals(sig).name} "
                                     f"within {timeout} s")
            await asyncio.sleep(0.005)   # polling pace

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def rss_kib(self) -> int:
        return vm_rss_kib(self.proc.pid)

    async def close(self) -> None:
        """Kill if still running, reap, stop the readers. Idempotent."""
        if self.proc.returncode is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass
        try:
            async with asyncio.timeout(10):
                await self.proc.wait()
        except TimeoutError:   # pragma: no cover - SIGKILL does not fail
            pass
        for r in self._readers:
            r.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
        # close our pipe ends (asyncio keeps the transports until the process object goes)
        transport = getattr(self.proc, "_transport", None)
        if transport is not None:
            transport.close()


class ProxyProc(_Child):
    """`python -m proxy ARGS` (the gatewise CLI) as a subprocess."""

    port: int = 0
    address: str = ""

    @classmethod
    async def start(cls, *args: str, new_session: bool = False) -> "ProxyProc":
        """`new_session`: its own process group (led by it), for signalling the group."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", *args, cwd=str(ROOT),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, start_new_session=new_session)
        return cls(proc, "gatewise " + " ".join(args))

    async def wait_listening(self, timeout: float = 15.0) -> int:
        event = await self.wait_event("listening", timeout)
        self.address = event["address"]
        self.port = int(self.address.rsplit(":", 1)[1])
        return self.port


class FaultProc(_Child):
    """`python -m proxy faults --listen 127.0.0.1:0 --mode MODE` as a subprocess."""

    port: int = 0

    @classmethod
    async def start(cls, mode: str, timeout: float = 15.0) -> "FaultProc":
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "faults", "--listen", "127.0.0.1:0", "--mode", mode,
            cwd=str(ROOT), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        self = cls(proc, f"gatewise faults --mode {mode}")
        try:
            m = await self.wait_stdout(r"(?:listening on|nothing listens on) \S*:(\d+)", timeout)
        except BaseException:
            await self.close()
            raise
        self.port = int(m[1])
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def write_config(path: Path, servers: list[str], *, pool: dict | None = None, **sections: dict) -> Path:
    """A TOML config: listen (and admin) on 127.0.0.1:0, one pool "app" of these server URLs,
    the implicit catch-all route; `sections` add or override tables ({"timeouts": {...}})."""
    data: dict = {"listen": {"address": "127.0.0.1:0"}, "admin": {"address": "127.0.0.1:0"}}
    for name, table in sections.items():
        data.setdefault(name, {}).update(table)
    data["pools"] = {"app": {**(pool or {}), "servers": [{"url": url} for url in servers]}}
    path.write_text(to_toml(data))
    return path


async def stop_gracefully(child: _Child, timeout: float = 10.0) -> int:
    """SIGTERM (once it is handled) and wait for the exit code."""
    if child.returncode is None:
        await child.wait_handles(signal.SIGTERM)
        child.send_signal(signal.SIGTERM)
    return await child.wait_exit(timeout)


@pytest.fixture
async def spawned():
    """Register subprocesses here (`spawned(child)`); all are killed and reaped at teardown."""
    children: list[_Child] = []

    def register(child: _Child) -> _Child:
        children.append(child)
        return child

    yield register
    for child in reversed(children):
        await child.close()
