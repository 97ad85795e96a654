"""Idle-connection bookkeeping (proxy/pool.py): pure, fake connections, fake time."""

from __future__ import annotations

from proxy.pool import KEEPALIVE_MARGIN, IdlePool, idle_expiry


class Conn:
    def __init__(self, name: str, alive: bool = True) -> None:
        self.name, self.alive = name, alive

    def __repr__(self) -> str:
        return self.name


def test_lifo_reuse_and_stale_entries_are_returned_for_closing():
    pool = IdlePool()
    a, b, c = Conn("a"), Conn("b"), Conn("c", alive=True)
    assert pool.put(a, expires=10, now=0) == ()
    assert pool.put(b, expires=5, now=0) == ()
    assert pool.put(c, expires=20, now=0) == ()
    conn, stale = pool.take(now=1)
    assert conn is c and stale == ()           # newest first
    conn, stale = pool.take(now=6)
    assert conn is a and stale == (b,)          # b expired at 5
    assert pool.take(now=7) == (None, ())


def test_dead_connections_are_skipped():
    pool = IdlePool()
    a, b = Conn("a"), Conn("b")
    pool.put(a, 10, 0)
    pool.put(b, 10, 0)
    b.alive = False  # the upstream closed it while idle
    conn, stale = pool.take(now=1)
    assert conn is a and stale == (b,)


def test_over_capacity_evicts_the_oldest():
    pool = IdlePool(max_idle=2)
    a, b, c = Conn("a"), Conn("b"), Conn("c")
    pool.put(a, 10, 0)
    pool.put(b, 10, 0)
    assert pool.put(c, 10, 0) == (a,)
    assert len(pool) == 2


def test_already_expired_is_closed_at_once():
    pool = IdlePool()
    a = Conn("a")
    assert pool.put(a, expires=1, now=1) == (a,)
    assert len(pool) == 0


def test_discard_and_drain():
    pool = IdlePool()
    a, b = Conn("a"), Conn("b")
    pool.put(a, 10, 0)
    pool.put(b, 10, 0)
    pool.discard(a)
    assert pool.drain() == [b] and len(pool) == 0


def test_idle_expiry_retires_before_the_advertised_timeout():
    assert idle_expiry(100.0, upstream_idle=60.0, advertised=None) == 160.0
    assert idle_expiry(100.0, upstream_idle=60.0, advertised=5.0) == 100.0 + 5.0 - KEEPALIVE_MARGIN
    assert idle_expiry(100.0, upstream_idle=2.0, advertised=30.0) == 102.0
