"""A closed connection is freed when it closes, not whenever CPython's cyclic garbage
collector next runs: each protocol, its parser, its timer and its exchanges refer to one
another, and connection_lost breaks those cycles. (Before that, RSS crept up by ~8 MiB
under GET / at c256 until a full collection; benchmarks/README.md.)"""

import gc

from proxy.downstream import DownstreamProtocol
from proxy.upstream_conn import UpstreamConnection
from tests.conftest import Client
from tests.rawclient import eventually

ROUNDS = 20


def live(kind) -> int:
    return sum(1 for o in gc.get_objects() if type(o) is kind)


async def test_closed_client_and_upstream_connections_are_freed_without_the_cyclic_gc(upstream, gateway):
    up = await upstream("ok")
    gw = await gateway([up])
    gc.collect()
    gc.disable()   # only reference counting may free them now
    try:
        before_clients = live(DownstreamProtocol)
        for _ in range(ROUNDS):
            client = await Client.open(gw.port)
            assert (await client.request(headers=[("Connection", "close")])).status == 200
            client.close()
        await eventually(lambda: not gw.proxy.connections, "every client connection closed")
        # "Connection: close" to the client; the upstream connection is pooled, so close
        # those too and wait until the proxy has seen them go
        gw.proxy.close_idle()  # a method: no local of this test keeps a connection alive
        await eventually(lambda: live(UpstreamConnection) == 0, "every upstream connection freed")
        assert live(DownstreamProtocol) - before_clients <= 1, \
            f"{live(DownstreamProtocol) - before_clients} closed client connections still alive"
    finally:
        gc.enable()
