"""Micro benchmarks of the pure hot-path pieces (not part of `make test`).

    .venv/bin/python benchmarks/micro.py

Prints microseconds per call (best of 5 repeats, timeit). The load benchmark against a
direct connection and nginx is bench.py (`make bench`); these numbers say where
per-request CPU goes inside gatewise itself.
"""

from __future__ import annotations

import timeit

from diagnostics import proxy_status
from diagnostics.causes import Cause
from proxy import headers as H
from proxy.balancer import make_balancer
from proxy.codec import make_request_parser
from proxy.codec.base import RequestHandler, RequestHead, ResponseHead
from proxy.servers import ServerState

REQUEST = (b"GET /api/items?page=2 HTTP/1.1\r\nHost: example.com\r\nUser-Agent: bench/1.0\r\n"
           b"Accept: */*\r\nAccept-Encoding: gzip\r\nConnection: keep-alive\r\n\r\n")


class _Sink(RequestHandler):
    def on_request_head(self, head): pass
    def on_request_body(self, data): pass
    def on_request_end(self, trailers): pass


def main() -> None:
    head = RequestHead(b"GET", b"/api/items?page=2", b"1.1",
                       [(b"Host", b"example.com"), (b"User-Agent", b"bench/1.0"), (b"Accept", b"*/*"),
                        (b"Accept-Encoding", b"gzip"), (b"Connection", b"keep-alive")], True, False)
    response = ResponseHead(200, b"OK", b"1.1", [(b"Content-Type", b"text/plain"),
                                                 (b"Content-Length", b"6"), (b"Date", b"x")])
    servers = [ServerState(url=f"http://127.0.0.1:{9000 + i}", host="127.0.0.1", port=9000 + i, weight=i + 1)
               for i in range(4)]
    balancer = make_balancer("weighted_round_robin", servers)
    parsers = {kind: make_request_parser(kind, _Sink(), 65536) for kind in ("llhttp", "h11")}
    H.scan_request(head, b"gatewise")  # fills the slots build_request_head reads
    cases = {
        "parse request head (llhttp)": lambda: parsers["llhttp"].feed(REQUEST),
        "parse request head (h11)": lambda: parsers["h11"].feed(REQUEST),
        "scan_request": lambda: H.scan_request(head, b"gatewise"),
        "build_request_head": lambda: H.build_request_head(head, target=head.target,
                                                           client_ip=b"127.0.0.1", proto=b"http",
                                                           via=b"1.1 gatewise"),
        "plan_response": lambda: H.plan_response(response, request_method=b"GET", client_version=b"1.1",
                                                 client_keep_alive=True, request_id=b"abc", via=b"1.1 gatewise",
                                                 proxy_status=None),
        "balancer pick (wrr, 4 servers)": lambda: balancer.pick(0.0),
        "Proxy-Status render": lambda: proxy_status.render_cause(
            "gatewise", Cause.CONNECT_REFUSED, next_hop="127.0.0.1:9002", details="connect ECONNREFUSED"),
    }
    for name, fn in cases.items():
        n = 20000
        best = min(timeit.repeat(fn, number=n, repeat=5)) / n
        print(f"{name:34} {best * 1e6:7.2f} us")


if __name__ == "__main__":
    main()
