"""The floor: the least a Python forwarder does per request on gatewise's stack.

    python benchmarks/floor.py --listen 127.0.0.1:8081 --upstream 127.0.0.1:8080 [--features]

uvloop, one asyncio.Protocol per connection, httptools on both sides, one upstream
keep-alive connection per client connection, heads rebuilt from the parsed fields, output
batched per read, backpressure both ways. Nothing else: no routing, balancing, pooling
across clients, timeouts, retries, health, header rewriting, ids, stats or recorder, and
Content-Length framing only (no chunked, no Upgrade, no HEAD), one request at a time per
connection (no pipelining, as wrk sends). The issue's "minimal
asyncio.Protocol + httptools forwarder", measured in the same run as gatewise and nginx
(`bench.py`'s "floor" column). Not part of gatewise and not for real traffic.

`--features` ("floor+features" in bench.py) adds, inline in the same callbacks, the work
gatewise's default config does for every request: header fields classified by name
(hop-by-hop ones dropped, Connection-named ones not handled), X-Forwarded-For/-Proto/
-Host, Via both ways, a request id (kept from a sane X-Request-Id, else 96 random bits)
both ways, Date added when missing, Proxy-Status received-status on a 5xx, a
per-connection deadline moved per request (an attribute write, as gatewise's Deadline
does), and the statistics gatewise keeps per request (responses by class, the latency
window with its EWMA, the upstream and request latency histograms). So: gatewise - floor
is what gatewise costs; floor+features - floor is what the features cost when done with
no layering; gatewise - floor+features is the layering.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import httptools
import uvloop

from proxy.stats import Histogram
from proxy.headers import _SANE_ID as SANE_ID, HOP_BY_HOP, date_field, new_request_id_bytes
from proxy.servers import LatencyWindow


class Upstream(asyncio.Protocol):
    def __init__(self, client: "Client") -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.reason = b""
        self.fields: list[bytes] = []

    def connection_made(self, transport) -> None:
        self.transport = transport
        if self.client.closed:  # the client left while this connect was under way
            transport.close()
            return
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
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields += (name, b": ", value, b"\r\n")

    def on_headers_complete(self) -> None:
        out = self.client.out
        out += (b"HTTP/1.1 %d " % self.parser.get_status_code(), self.reason, b"\r\n")
        out += self.fields
        out.append(b"\r\n")
        self.fields = []
        self.reason = b""

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
        self.closed = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.connect(Upstream)

    def connect(self, kind) -> None:
        loop = asyncio.get_running_loop()
        host, port = self.upstream_address
        task = loop.create_task(loop.create_connection(lambda: kind(self), host, port))
        task.add_done_callback(self._connected)

    def _connected(self, task: asyncio.Task) -> None:
        if task.cancelled() or task.exception() is not None:
            self.transport.close()  # no upstream: the client gets a closed connection

    def upstream_ready(self, upstream: Upstream) -> None:
        self.upstream = upstream
        if self.pending:
            upstream.transport.writelines(self.pending)
            self.pending = []

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def connection_lost(self, exc) -> None:
        self.closed = True
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


# -- --features: the per-request work of gatewise's defaults, inline --------------------------
# gatewise's own pieces where one call does the feature's work (the id, Date, the latency
# window and histograms): what they cost is the features' cost, not the layering's.
VIA = b"1.1 gatewise"
KEEP, DROP, HOST, XFF, VIA_F, REQUEST_ID, DATE = range(7)
REQUEST_KINDS = {**{n: DROP for n in HOP_BY_HOP}, b"host": HOST, b"x-forwarded-for": XFF, b"via": VIA_F,
                 b"x-request-id": REQUEST_ID, b"x-forwarded-proto": DROP, b"x-forwarded-host": DROP}
RESPONSE_KINDS = {**{n: DROP for n in HOP_BY_HOP}, b"via": VIA_F, b"x-request-id": DROP, b"date": DATE}


class Stats:
    """One server's and one pool's statistics, as gatewise keeps them per request."""

    def __init__(self) -> None:
        self.by_class = [0] * 6
        self.latency = LatencyWindow()
        self.upstream_latency = Histogram()
        self.request_latency = Histogram()


STATS = Stats()


def kind_of(kinds: dict, cache: dict, name: bytes) -> int:
    kind = cache.get(name)
    if kind is None:
        kind = cache[name] = kinds.get(name.lower(), KEEP)
    return kind


class FeatureUpstream(Upstream):
    kinds: dict = {}

    def __init__(self, client) -> None:
        super().__init__(client)
        self.via = None
        self.date = False

    def on_header(self, name: bytes, value: bytes) -> None:
        kind = kind_of(RESPONSE_KINDS, self.kinds, name)
        if kind == KEEP:
            self.fields += (name, b": ", value, b"\r\n")
        elif kind == VIA_F:
            self.via = value if self.via is None else self.via + b", " + value
        elif kind == DATE:
            self.date = True
            self.fields += (name, b": ", value, b"\r\n")

    def on_headers_complete(self) -> None:
        client = self.client
        status = self.parser.get_status_code()
        out = client.out
        out += (b"HTTP/1.1 %d " % status, self.reason, b"\r\n")
        out += self.fields
        out += (b"Via: ", VIA if self.via is None else self.via + b", " + VIA, b"\r\n")
        if not self.date:
            out.append(date_field())
        if status >= 500:
            out.append(b"Proxy-Status: gatewise; received-status=%d\r\n" % status)
        out += (b"X-Request-Id: ", client.current_id, b"\r\n\r\n")
        self.fields = []
        self.reason = b""
        self.via = None
        self.date = False
        seconds = time.perf_counter() - client.started
        st = STATS
        st.by_class[status // 100 if status < 600 else 5] += 1
        st.latency.add(seconds * 1000)
        st.upstream_latency.observe(seconds)
        st.request_latency.observe(seconds)  # gatewise times the whole request apart


class FeatureClient(Client):
    kinds: dict = {}

    def __init__(self, upstream) -> None:
        super().__init__(upstream)
        self.host = self.xff = self.via = None
        self.request_id = b""  # a sane one from the client's head
        self.current_id = b""  # the id of the request being answered
        self.started = 0.0
        self.deadline = 0.0
        self.client_ip = b"127.0.0.1"

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.client_ip = transport.get_extra_info("peername")[0].encode()
        self.connect(FeatureUpstream)

    def on_header(self, name: bytes, value: bytes) -> None:
        kind = kind_of(REQUEST_KINDS, self.kinds, name)
        if kind == KEEP:
            self.fields += (name, b": ", value, b"\r\n")
        elif kind == HOST:
            self.host = value
            self.fields += (name, b": ", value, b"\r\n")
        elif kind == XFF:
            self.xff = value if self.xff is None else self.xff + b", " + value
        elif kind == VIA_F:
            self.via = value if self.via is None else self.via + b", " + value
        elif kind == REQUEST_ID and SANE_ID.fullmatch(value):
            self.request_id = value

    def on_headers_complete(self) -> None:
        self.started = time.perf_counter()
        self.deadline = asyncio.get_running_loop().time() + 75.0
        self.current_id = self.request_id or new_request_id_bytes()
        xff = self.xff
        out = [self.parser.get_method(), b" ", self.url, b" HTTP/1.1\r\n", *self.fields,
               b"X-Forwarded-For: ", self.client_ip if xff is None else xff + b", " + self.client_ip, b"\r\n",
               b"X-Forwarded-Proto: http\r\n"]
        if self.host is not None:
            out += (b"X-Forwarded-Host: ", self.host, b"\r\n")
        out += (b"Via: ", VIA if self.via is None else self.via + b", " + VIA, b"\r\n",
                b"X-Request-Id: ", self.current_id, b"\r\n\r\n")
        self.send(b"".join(out))
        self.url = b""
        self.fields = []
        self.host = self.xff = self.via = None
        self.request_id = b""


READY = r"floor listening on 127\.0\.0\.1:(\d+)"  # what the line printed once listening matches


def command(python: str, upstream_port: int, features: bool) -> list[str]:
    """The command bench.py and profile.py start the floor with, on a free loopback port
    (read it from the output with READY)."""
    return ([python, __file__, "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{upstream_port}"]
            + (["--features"] if features else []))


async def main(listen: tuple[str, int], upstream: tuple[str, int], features: bool) -> None:
    loop = asyncio.get_running_loop()
    client = FeatureClient if features else Client
    server = await loop.create_server(lambda: client(upstream), *listen, backlog=4096)
    print(f"floor listening on {listen[0]}:{server.sockets[0].getsockname()[1]}", flush=True)
    await server.serve_forever()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--listen", type=_address, required=True)
    p.add_argument("--upstream", type=_address, required=True)
    p.add_argument("--features", action="store_true", help="do gatewise's per-request feature work inline")
    args = p.parse_args()
    try:
        uvloop.run(main(args.listen, args.upstream, args.features))
    except KeyboardInterrupt:
        sys.exit(0)
