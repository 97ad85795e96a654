"""The floor: the least a Python forwarder does per request on gatewise's stack.

    python benchmarks/floor.py --listen 127.0.0.1:8081 --upstream 127.0.0.1:8080

uvloop, one asyncio.Protocol per connection, httptools on both sides, one upstream
keep-alive connection per client connection, heads rebuilt from the parsed fields, output
batched per read, backpressure both ways. Nothing else: no routing, balancing, pooling
across clients, timeouts, retries, health, header rewriting, ids, stats or recorder, and
Content-Length framing only (no chunked, no Upgrade, no HEAD). The issue's "minimal
asyncio.Protocol + httptools forwarder": what gatewise's features cost is gatewise's
figures minus these, measured in the same run (`bench.py`'s "floor" column). Not part of
gatewise and not for real traffic.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import httptools
import uvloop


class Upstream(asyncio.Protocol):
    def __init__(self, client: "Client") -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.reason = b""
        self.fields: list[bytes] = []

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.client.upstream_ready(self)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)
        self.client.flush()

    def connection_lost(self, exc) -> None:
        self.client.transport.close()

    def pause_writing(self) -> None:
        self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        self.client.transport.resume_reading()

    def on_status(self, reason: bytes) -> None:
        self.reason = reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields += (name, b": ", value, b"\r\n")

    def on_headers_complete(self) -> None:
        out = self.client.out
        out += (b"HTTP/1.1 %d " % self.parser.get_status_code(), self.reason, b"\r\n")
        out += self.fields
        out.append(b"\r\n")
        self.fields = []

    def on_body(self, data: bytes) -> None:
        self.client.out.append(data)


class Client(asyncio.Protocol):
    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream_address = upstream
        self.transport: asyncio.Transport | None = None
        self.upstream: Upstream | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.fields: list[bytes] = []
        self.out: list[bytes] = []
        self.pending: list[bytes] = []  # request bytes while the upstream connects

    def connection_made(self, transport) -> None:
        self.transport = transport
        loop = asyncio.get_running_loop()
        host, port = self.upstream_address
        loop.create_task(loop.create_connection(lambda: Upstream(self), host, port))

    def upstream_ready(self, upstream: Upstream) -> None:
        self.upstream = upstream
        if self.pending:
            upstream.transport.writelines(self.pending)
            self.pending = []

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def connection_lost(self, exc) -> None:
        if self.upstream is not None:
            self.upstream.transport.close()

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.transport.resume_reading()

    def send(self, data: bytes) -> None:
        if self.upstream is None:
            self.pending.append(data)
        else:
            self.upstream.transport.write(data)

    def flush(self) -> None:
        if self.out:
            self.transport.write(b"".join(self.out))
            self.out = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields += (name, b": ", value, b"\r\n")

    def on_headers_complete(self) -> None:
        self.send(b"".join([self.parser.get_method(), b" ", self.url, b" HTTP/1.1\r\n", *self.fields, b"\r\n"]))
        self.url = b""
        self.fields = []

    def on_body(self, data: bytes) -> None:
        self.send(data)


async def main(listen: tuple[str, int], upstream: tuple[str, int]) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Client(upstream), *listen, backlog=4096)
    print(f"floor listening on {listen[0]}:{server.sockets[0].getsockname()[1]}", flush=True)
    await server.serve_forever()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--listen", type=_address, required=True)
    p.add_argument("--upstream", type=_address, required=True)
    args = p.parse_args()
    try:
        uvloop.run(main(args.listen, args.upstream))
    except KeyboardInterrupt:
        sys.exit(0)
