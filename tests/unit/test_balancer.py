"""proxy.balancer: smooth WRR, least_conn, weighted random, backups, exclude."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from proxy.balancer import make_balancer
from proxy.servers import ServerState

KINDS = ["weighted_round_robin", "least_conn", "random", "p2c_ewma"]


class FakeServer(ServerState):
    """A ServerState whose availability the test controls (no monkeypatching)."""

    __slots__ = ("up",)

    def __init__(self, url: str, host: str, port: int, weight: int = 1, backup: bool = False) -> None:
        super().__init__(url, host, port, weight, backup)
        self.up = True

    def available(self, now: float) -> bool:
        return self.up


def srv(name: str, weight: int = 1, backup: bool = False) -> FakeServer:
    return FakeServer(url=f"http://{name}", host=name, port=80, weight=weight, backup=backup)


def names(balancer, n: int, now: float = 0.0, exclude=()) -> str:
    return "".join(balancer.pick(now, exclude).host for _ in range(n))


# -- weighted round robin ---------------------------------------------------------


def test_wrr_3_to_1_exact_over_400_and_every_window():
    b = make_balancer("weighted_round_robin", [srv("a", 3), srv("b", 1)])
    seq = names(b, 400)
    assert Counter(seq) == {"a": 300, "b": 100}
    for i in range(len(seq) - 3):
        assert Counter(seq[i : i + 4]) == {"a": 3, "b": 1}, (i, seq[i : i + 4])


def test_wrr_is_smooth_5_1_1():
    b = make_balancer("weighted_round_robin", [srv("a", 5), srv("b", 1), srv("c", 1)])
    assert names(b, 14) == "aabacaa" * 2


def test_wrr_equal_weights_alternate():
    b = make_balancer("weighted_round_robin", [srv("a"), srv("b"), srv("c")])
    assert names(b, 6) == "abcabc"


def test_wrr_exact_proportions_over_every_window_of_sum_weights():
    weights = {"a": 4, "b": 3, "c": 2, "d": 1}
    b = make_balancer("weighted_round_robin", [srv(n, w) for n, w in weights.items()])
    seq = names(b, 200)
    for i in range(len(seq) - 9):
        assert Counter(seq[i : i + 10]) == weights


def test_wrr_skips_unavailable_and_resumes():
    a, b_, c = srv("a"), srv("b"), srv("c")
    b = make_balancer("weighted_round_robin", [a, b_, c])
    b_.up = False
    assert set(names(b, 10)) == {"a", "c"}
    b_.up = True
    assert set(names(b, 6)) == {"a", "b", "c"}


def test_wrr_exclude_and_remaining_share():
    a, b_ = srv("a", 3), srv("b", 1)
    b = make_balancer("weighted_round_robin", [a, b_])
    assert names(b, 5, exclude=[a]) == "bbbbb"
    assert names(b, 5, exclude={b_}) == "aaaaa"


# -- behaviour shared by every kind -----------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_none_when_nothing_available(kind):
    a, bk = srv("a"), srv("bk", backup=True)
    b = make_balancer(kind, [a, bk], rng=random.Random(1))
    a.up = bk.up = False
    assert b.pick(0.0) is None


@pytest.mark.parametrize("kind", KINDS)
def test_none_for_empty_pool(kind):
    assert make_balancer(kind, [], rng=random.Random(1)).pick(0.0) is None


@pytest.mark.parametrize("kind", KINDS)
def test_backup_only_when_no_primary_candidate(kind):
    p1, p2, bk = srv("p1"), srv("p2"), srv("bk", weight=10, backup=True)
    b = make_balancer(kind, [bk, p1, p2], rng=random.Random(1))
    assert "bk" not in {b.pick(0.0).host for _ in range(50)}
    p1.up = False
    assert {b.pick(0.0).host for _ in range(50)} == {"p2"}
    # All primaries out: unavailable or excluded both count.
    assert b.pick(0.0, exclude=[p2]) is bk
    p2.up = False
    assert b.pick(0.0) is bk
    p1.up = True
    assert b.pick(0.0) is p1


@pytest.mark.parametrize("kind", KINDS)
def test_exclude_then_retry_without_exclude(kind):
    """The retry contract: None with a non-empty exclude means 'all tried'."""
    a, c = srv("a"), srv("c")
    b = make_balancer(kind, [a, c], rng=random.Random(1))
    first = b.pick(0.0)
    second = b.pick(0.0, exclude=[first])
    assert second is not None and second is not first
    assert b.pick(0.0, exclude=[first, second]) is None
    assert b.pick(0.0) in (a, c)


@pytest.mark.parametrize("kind", KINDS)
def test_excluded_backup_not_picked(kind):
    p, bk = srv("p"), srv("bk", backup=True)
    b = make_balancer(kind, [p, bk], rng=random.Random(1))
    assert b.pick(0.0, exclude=(p, bk)) is None


def test_unknown_kind():
    with pytest.raises(ValueError):
        make_balancer("hash", [srv("a")])


# -- least_conn -------------------------------------------------------------------


def test_least_conn_prefers_less_loaded():
    a, b_, c = srv("a"), srv("b"), srv("c")
    a.active_requests, b_.active_requests, c.active_requests = 5, 1, 3
    b = make_balancer("least_conn", [a, b_, c])
    assert b.pick(0.0) is b_
    assert b.pick(0.0, exclude=[b_]) is c


def test_least_conn_respects_weight():
    # 4/4 = 1 beats 2/1 = 2, though a has more requests in flight.
    a, c = srv("a", weight=4), srv("c", weight=1)
    a.active_requests, c.active_requests = 4, 2
    b = make_balancer("least_conn", [c, a])
    assert b.pick(0.0) is a


def test_least_conn_ties_use_smooth_wrr():
    a, c = srv("a", weight=3), srv("c", weight=1)
    b = make_balancer("least_conn", [a, c])
    # Nobody is ever busy here, so every pick is a tie: pure smooth WRR.
    assert names(b, 8) == "aacaaaca"


def test_least_conn_tie_only_among_least_loaded():
    a, c, d = srv("a"), srv("c"), srv("d")
    a.active_requests = 1
    b = make_balancer("least_conn", [a, c, d])
    assert names(b, 4) == "cdcd"


def test_least_conn_skips_unavailable():
    a, c = srv("a"), srv("c")
    c.active_requests = 10
    a.up = False
    assert make_balancer("least_conn", [a, c]).pick(0.0) is c


def test_least_conn_simulated_load_follows_requests():
    servers = [srv("a"), srv("b"), srv("c")]
    b = make_balancer("least_conn", servers)
    picked = [b.pick(0.0) for _ in range(3)]
    for s in picked:
        s.on_attempt_start()
    assert set(picked) == set(servers)
    picked[1].on_attempt_end(False)
    assert b.pick(0.0) is picked[1]


# -- random -----------------------------------------------------------------------


def test_random_approximates_weights():
    b = make_balancer("random", [srv("a", 3), srv("b", 1)], rng=random.Random(42))
    counts = Counter(names(b, 10_000))
    assert 7200 <= counts["a"] <= 7800
    assert counts["a"] + counts["b"] == 10_000


def test_random_approximates_weights_with_some_unavailable():
    a, b_, c = srv("a", 2), srv("b", 5), srv("c", 1)
    b_.up = False
    b = make_balancer("random", [a, b_, c], rng=random.Random(7))
    counts = Counter(names(b, 10_000))
    assert counts["b"] == 0
    assert 6300 <= counts["a"] <= 7000


def test_random_never_picks_excluded():
    a, b_, c = srv("a", 5), srv("b", 1), srv("c", 1)
    b = make_balancer("random", [a, b_, c], rng=random.Random(3))
    seen = Counter(names(b, 2000, exclude=[a]))
    assert seen["a"] == 0 and seen["b"] > 0 and seen["c"] > 0


def test_random_is_reproducible_with_seed():
    def run() -> str:
        b = make_balancer("random", [srv("a", 2), srv("b", 1)], rng=random.Random(99))
        return names(b, 50)

    assert run() == run()


def test_p2c_ewma_prefers_the_fast_server():
    """p2c_ewma: with one server at 50 ms and one at 1 ms (EWMA), the fast one gets the
    large majority of picks; the slow one is still sampled now and then."""
    slow = ServerState("http://s:1", "s", 1)
    fast = ServerState("http://f:2", "f", 2)
    for _ in range(5):
        slow.latency.add(50.0)
        fast.latency.add(1.0)
    b = make_balancer("p2c_ewma", [slow, fast], rng=random.Random(7))
    picks = [b.pick(0.0) for _ in range(200)]
    assert picks.count(fast) == 200  # a pair of two always holds both: the cheaper wins


def test_p2c_ewma_weighs_load_and_weight():
    a = ServerState("http://a:1", "a", 1, weight=1)
    c = ServerState("http://c:2", "c", 2, weight=1)
    a.latency.add(10.0)
    c.latency.add(10.0)
    a.active_requests = 3  # same latency, more in flight: c is cheaper
    b = make_balancer("p2c_ewma", [a, c], rng=random.Random(1))
    assert b.pick(0.0) is c
    heavy = ServerState("http://h:3", "h", 3, weight=10)
    heavy.latency.add(10.0)
    heavy.active_requests = 3  # 10x the weight outweighs the extra load
    b = make_balancer("p2c_ewma", [c, heavy], rng=random.Random(1))
    assert b.pick(0.0) is heavy


def test_p2c_ewma_tries_unmeasured_servers_first():
    measured = ServerState("http://m:1", "m", 1)
    measured.latency.add(5.0)
    new = ServerState("http://n:2", "n", 2)
    b = make_balancer("p2c_ewma", [measured, new], rng=random.Random(3))
    assert b.pick(0.0) is new


@pytest.mark.parametrize("kind", KINDS)
def test_a_sole_primary_is_picked_while_it_is_a_candidate(kind):
    """One primary: every kind picks it (no kind is asked); excluded or unavailable, the
    backups decide, and with none there is nothing to pick."""
    p, bk = srv("p", weight=3), srv("bk", backup=True)
    b = make_balancer(kind, [p, bk], rng=random.Random(1))
    assert names(b, 5) == "ppppp" and p.current_weight == 0
    assert b.pick(0.0, exclude=[p]) is bk
    p.up = False
    assert b.pick(0.0) is bk
    a = srv("a")
    alone = make_balancer(kind, [a], rng=random.Random(1))
    assert alone.pick(0.0) is a
    assert alone.pick(0.0, exclude=[a]) is None
