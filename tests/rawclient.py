"""A raw-socket test client and polling helpers shared by the integration tests.

Raw sockets rather than asyncio streams: when the proxy answers and then resets the
connection, StreamReader.read() would drop the answer; sock_recv returns it first.
"""

from __future__ import annotations

import asyncio
import socket
import struct


class Raw:
    """One client connection on a raw non-blocking socket, optionally with a small
    receive buffer (set before connect, so the TCP window is negotiated with it)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()

    @classmethod
    async def open(cls, port: int, rcvbuf: int | None = None) -> "Raw":
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if rcvbuf is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.setblocking(False)
            async with asyncio.timeout(5):
                await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    async def send(self, data: bytes) -> bool:
        """False when the proxy has already closed (reset or broken pipe)."""
        try:
            async with asyncio.timeout(5):
                await self.loop.sock_sendall(self.sock, data)
            return True
        except (ConnectionResetError, BrokenPipeError):
            return False

    async def recv_until_close(self, timeout: float) -> tuple[bytes, bool]:
        """Everything received until the proxy closes (FIN or RST), or until `timeout`.
        Returns (data, closed)."""
        data = bytearray()
        try:
            async with asyncio.timeout(timeout):
                while True:
                    try:
                        piece = await self.loop.sock_recv(self.sock, 65536)
                    except ConnectionResetError:
                        return bytes(data), True
                    if not piece:
                        return bytes(data), True
                    data += piece
        except TimeoutError:
            return bytes(data), False

    async def recv_some(self, n: int, timeout: float = 5.0) -> int:
        """Read (and drop) at least n bytes; returns how many were read."""
        got = 0
        async with asyncio.timeout(timeout):
            while got < n:
                piece = await self.loop.sock_recv(self.sock, 65536)
                if not piece:
                    break
                got += len(piece)
        return got

    async def recv_exactly(self, n: int, timeout: float = 5.0) -> bytes:
        data = bytearray()
        async with asyncio.timeout(timeout):
            while len(data) < n:
                piece = await self.loop.sock_recv(self.sock, min(65536, n - len(data)))
                assert piece, f"closed after {len(data)} of {n} bytes"
                data += piece
        return bytes(data)

    def peek(self, n: int = 65536) -> bytes:
        """What has arrived so far, without consuming it (b"" when nothing yet)."""
        try:
            return self.sock.recv(n, socket.MSG_PEEK)
        except BlockingIOError:
            return b""

    def close(self) -> None:
        """A normal close(): FIN (the receive queue is empty or irrelevant)."""
        self.sock.close()

    def reset(self) -> None:
        """close() with SO_LINGER {on, 0}: RST."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


async def eventually(predicate, what: str, timeout: float = 3.0, pace: float = 0.01):
    """Poll `predicate` until it returns something truthy (returned); fail after `timeout`
    seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (result := predicate()):
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(pace)
    return result


async def until(check, what: str, timeout: float = 3.0):
    """Await `check()` until it returns something truthy (returned); fail after `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = await check()
        if result:
            return result
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.01)


def forward_tasks() -> list[asyncio.Task]:
    """Tasks running proxy.forward.forward, by the name forward.py gives each (a compiled
    coroutine has no code object to match)."""
    from proxy.forward import TASK_NAME
    return [task for task in asyncio.all_tasks() if task.get_name().startswith(TASK_NAME)]
