"""proxy.flow.Outbox: writes held to the end of a loop iteration's callbacks (no sockets:
stand-in connections record what they are asked to write)."""

from __future__ import annotations

import asyncio

from proxy.flow import Outbox


class Transport:
    def __init__(self, log: list, name: str, fail: bool = False) -> None:
        self.log, self.name, self.fail = log, name, fail

    def write(self, data: bytes) -> None:
        if self.fail:
            raise RuntimeError("transport broke")
        self.log.append((self.name, data))


class Conn:
    def __init__(self, log: list, name: str, fail: bool = False) -> None:
        self.transport = Transport(log, name, fail)
        self.alive = True


class Client:
    def __init__(self, log: list, name: str) -> None:
        self.log, self.name = log, name

    def flush(self) -> None:
        self.log.append((self.name, "flush"))


class CountingLoop:
    """The running loop, counting the callbacks scheduled on it (works on any loop)."""

    def __init__(self, loop) -> None:
        self.loop, self.scheduled = loop, 0

    def call_soon(self, callback, *args):
        self.scheduled += 1
        return self.loop.call_soon(callback, *args)

    def call_exception_handler(self, context) -> None:
        self.loop.call_exception_handler(context)


async def test_held_until_the_callbacks_of_this_iteration_have_run_then_done_together():
    loop = CountingLoop(asyncio.get_running_loop())
    log: list = []
    outbox = Outbox(loop)
    a, b = Conn(log, "a"), Conn(log, "b")
    outbox.write(a, b"1")   # (the I/O callbacks of one iteration all run before its
    outbox.write(b, b"2")   # ready callbacks: here, plain calls stand for them)
    outbox.flush(Client(log, "c"))
    assert loop.scheduled == 1  # one loop callback for all three
    assert log == []
    await asyncio.sleep(0)  # one loop iteration: the thing under test, not a wait
    assert log == [("a", b"1"), ("b", b"2"), ("c", "flush")]
    outbox.write(a, b"3")  # a new round: held again, then done
    assert log[-1] == ("c", "flush")
    await asyncio.sleep(0)
    assert log[-1] == ("a", b"3")


async def test_a_connection_closed_meanwhile_gets_nothing():
    log: list = []
    outbox = Outbox(asyncio.get_running_loop())
    gone, kept = Conn(log, "gone"), Conn(log, "kept")
    outbox.write(gone, b"x")
    outbox.write(kept, b"y")
    assert gone.held and kept.held  # written to neither yet
    gone.alive = False  # cancelled (or lost) before the loop got to it
    await asyncio.sleep(0)
    assert log == [("kept", b"y")]
    assert gone.held and not kept.held  # what gone was given was never written


async def test_a_failed_write_is_reported_and_holds_back_nothing():
    loop = asyncio.get_running_loop()
    reported: list = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context["exception"]))
    try:
        log: list = []
        outbox = Outbox(loop)
        outbox.write(Conn(log, "broken", fail=True), b"x")
        outbox.write(Conn(log, "fine"), b"y")
        outbox.flush(Client(log, "c"))
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert log == [("fine", b"y"), ("c", "flush")]
    assert [str(e) for e in reported] == ["transport broke"]
