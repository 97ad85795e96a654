"""Backpressure both ways (SPEC "Forwarding semantics": a slow reader never grows memory
without bound), measured on a real `gatewise run` subprocess through its VmRSS.

Download: the upstream streams 500 MB as fast as the proxy reads it; the client has a
64 KiB receive buffer and reads ~1 MB/s. Upload: the client pushes a 200 MB body as fast as
it can; the upstream reads 1 MB/s. Either way the proxy may hold a few buffers' worth, never
what the fast side could deliver in the test's ~4 s (hundreds of MB on loopback).

Run with `-s` to see the measured figures (lines start with "RSS ").
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from tests.conftest import http
from tests.procs import FaultProc, ProxyProc, spawned, write_config  # noqa: F401  (spawned: fixture)

pytestmark = pytest.mark.slow

MB = 1_000_000
RSS_GROWTH_BOUND_KIB = 20 * 1024   # generous: without backpressure growth is hundreds of MB
RATE = 1_000_000                   # bytes/s the slow side moves
DURATION = 4.0                     # seconds of transfer while sampling
SAMPLE_EVERY = 0.25
PIECE = 64 * 1024


async def _sample_rss(child: ProxyProc, until: float, samples: list[int]) -> None:
    """VmRSS every SAMPLE_EVERY seconds until loop time `until` (pacing, not synchronisation)."""
    loop = asyncio.get_running_loop()
    for _ in range(int(DURATION / SAMPLE_EVERY) + 40):   # bounded; `until` normally ends it
        samples.append(child.rss_kib())
        if loop.time() >= until:
            return
        await asyncio.sleep(SAMPLE_EVERY)


def _report(direction: str, baseline: int, samples: list[int], moved: int, elapsed: float) -> int:
    peak = max(samples)
    growth = peak - baseline
    print(f"\nRSS {direction}: baseline={baseline / 1024:.1f} MiB peak={peak / 1024:.1f} MiB "
          f"growth={growth / 1024:.1f} MiB (bound {RSS_GROWTH_BOUND_KIB / 1024:.0f} MiB); "
          f"client moved {moved / MB:.1f} MB in {elapsed:.1f} s")
    print(f"RSS {direction} samples (MiB): " + " ".join(f"{s / 1024:.1f}" for s in samples))
    return growth


async def _open_small_rcvbuf(port: int, rcvbuf: int = 64 * 1024):
    """A client connection whose kernel receive buffer is small (set before connect, so the
    TCP window is negotiated with it) and whose StreamReader holds at most ~2 pieces."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        async with asyncio.timeout(5):
            await loop.sock_connect(sock, ("127.0.0.1", port))
        return await asyncio.open_connection(sock=sock, limit=PIECE)
    except BaseException:
        sock.close()
        raise


async def test_download_slow_reader_bounded_memory(spawned, tmp_path):
    up = spawned(await FaultProc.start("ok"))
    gw = spawned(await ProxyProc.start("run", "-c", str(write_config(tmp_path / "gw.toml", [up.url]))))
    port = await gw.wait_listening()

    warm = await http(port, "GET", "/bytes/2000000", timeout=20)
    assert warm.status == 200 and len(warm.body) == 2_000_000
    baseline = gw.rss_kib()

    loop = asyncio.get_running_loop()
    reader, writer = await _open_small_rcvbuf(port)
    try:
        writer.write(b"GET /bytes/500000000 HTTP/1.1\r\nHost: test\r\n\r\n")
        await writer.drain()
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), head
        assert b"\r\ncontent-length: 500000000\r\n" in head.lower(), head

        start = loop.time()
        until = start + DURATION
        samples: list[int] = []
        sampler = asyncio.create_task(_sample_rss(gw, until, samples))
        received = 0
        try:
            while (now := loop.time()) < until:
                async with asyncio.timeout(until - now + 5):
                    data = await reader.read(PIECE)
                assert data, f"proxy closed the download after {received} body bytes"
                received += len(data)
                pace = start + received / RATE - loop.time()   # ~1 MB/s
                if pace > 0:
                    await asyncio.sleep(min(pace, max(0.0, until - loop.time())))
        finally:
            await sampler
        elapsed = loop.time() - start
    finally:
        writer.transport.abort()

    growth = _report("download", baseline, samples, received, elapsed)
    assert received >= 2 * MB, "the slow reader should still get ~1 MB/s"
    assert received < 50 * MB, "the client read much faster than paced: not a slow reader"
    assert growth < RSS_GROWTH_BOUND_KIB, f"proxy RSS grew {growth} KiB with a slow reader"

    after = await http(port, "GET", "/", timeout=10)
    assert after.status == 200 and after.header("x-upstream")


async def test_upload_slow_upstream_bounded_memory(upstream, spawned, tmp_path):
    up = await upstream("ok", read_rate=RATE)
    gw = spawned(await ProxyProc.start("run", "-c", str(write_config(tmp_path / "gw.toml", [up.url]))))
    port = await gw.wait_listening()

    warm = await http(port, "POST", "/echo", body=b"w" * 50_000, timeout=10)
    assert warm.status == 200, warm
    baseline = gw.rss_kib()

    loop = asyncio.get_running_loop()
    total = 200 * MB
    piece = b"u" * PIECE
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: %d\r\n\r\n" % total)
        start = loop.time()
        until = start + DURATION
        samples: list[int] = []
        sampler = asyncio.create_task(_sample_rss(gw, until, samples))
        sent = 0
        try:
            while sent + PIECE <= total and (now := loop.time()) < until:
                writer.write(piece)
                sent += PIECE
                try:
                    async with asyncio.timeout(until - now):
                        await writer.drain()
                except TimeoutError:
                    break   # the proxy stopped reading us until the end: that is backpressure
        finally:
            await sampler
        elapsed = loop.time() - start
    finally:
        writer.transport.abort()

    growth = _report("upload", baseline, samples, sent, elapsed)
    assert sent < total, "the whole 200 MB went out in 4 s: something buffered it"
    assert growth < RSS_GROWTH_BOUND_KIB, f"proxy RSS grew {growth} KiB with a slow upstream"

    after = await http(port, "GET", "/health", timeout=10)
    assert after.status == 200
    # the upstream saw the proxy's warm-up and health requests; the aborted upload is never complete
    assert up.requests_seen == 2


async def test_download_reference_rate_without_pacing(spawned, tmp_path):
    """Calibration for the bound above: a client that reads as fast as it can gets far more
    than RSS_GROWTH_BOUND_KIB through the proxy in DURATION, so an unbounded buffer in the
    slow-reader test would have shown up as growth well over the bound."""
    up = spawned(await FaultProc.start("ok"))
    gw = spawned(await ProxyProc.start("run", "-c", str(write_config(tmp_path / "gw.toml", [up.url]))))
    port = await gw.wait_listening()
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    try:
        writer.write(b"GET /bytes/500000000 HTTP/1.1\r\nHost: test\r\n\r\n")
        reply_head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert reply_head.startswith(b"HTTP/1.1 200 ")
        start = loop.time()
        until = start + 1.0
        received = 0
        while (now := loop.time()) < until and received < 500 * MB:
            async with asyncio.timeout(until - now + 5):
                data = await reader.read(1 << 20)
            assert data
            received += len(data)
    finally:
        writer.transport.abort()
    rate = received / (loop.time() - start)
    print(f"\nRSS reference: unpaced download through the proxy {rate / MB:.0f} MB/s: without "
          f"backpressure the 500 MB body could pile up in the proxy within {500 * MB / rate:.1f} s")
    assert rate * DURATION > 5 * RSS_GROWTH_BOUND_KIB * 1024
