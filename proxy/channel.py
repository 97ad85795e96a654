"""The supervisor <-> worker channel: length-prefixed orjson messages over a socketpair
(framing and message types in proxy/cluster.py)."""

from __future__ import annotations

import asyncio
import socket

from proxy.cluster import ChannelError, Decoder, encode
from proxy.logs import log_event


class Channel(asyncio.Protocol):
    """Calls `on_message(message)` for each message and `on_closed()` once at the end."""

    def __init__(self, on_message, on_closed) -> None:
        self._on_message = on_message
        self._on_closed = on_closed
        self._decoder = Decoder()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            messages = self._decoder.feed(data)
        except ChannelError as exc:
            log_event("internal_error", where="channel", error=str(exc))
            self.transport.abort()
            return
        for message in messages:
            self._on_message(message)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._on_closed()

    def send(self, message: dict) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(encode(message))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def open_channel(sock: socket.socket, on_message, on_closed) -> Channel:
    loop = asyncio.get_running_loop()
    _, channel = await loop.create_unix_connection(lambda: Channel(on_message, on_closed), sock=sock)
    return channel
