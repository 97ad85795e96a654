"""Flow-control primitives shared by both sides of the proxy.

- Outbox: writes held to the end of a loop iteration's callbacks and done together.
- Deadline: one timer per connection, rescheduled lazily against an absolute deadline
  (aiohttp's keep-alive handling): moving a deadline later is an attribute write, not a
  timer cancel/create, so refreshing it on every body chunk costs almost nothing.
- ReadGate: pause_reading/resume_reading with reasons, so that independent reasons to
  stop reading (the other side's buffer is full, pipelined requests are queued) never
  resume each other's pause. Pause and resume are idempotent per reason.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Final

# Write-buffer watermarks for every transport gatewise owns. 64 KiB high water keeps the
# bytes held per direction per connection small (backpressure target: a slow client
# costs a bounded amount of memory) while still letting a 256 KiB socket buffer fill.
HIGH_WATER: Final = 64 * 1024
LOW_WATER: Final = 16 * 1024


def _nothing() -> None:
    pass


class Deadline:
    __slots__ = ("_loop", "_callback", "_when", "_handle", "_at")

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self._loop = loop
        self._callback = callback
        self._when: float | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._at = 0.0

    def set(self, when: float | None) -> None:
        """Arm for absolute loop time `when` (None disarms)."""
        self._when = when
        if when is None:
            return
        handle = self._handle
        if handle is None:
            self._at = when
            self._handle = self._loop.call_at(when, self._fire)
        elif self._at > when:  # earlier than the pending timer: reschedule now
            handle.cancel()
            self._at = when
            self._handle = self._loop.call_at(when, self._fire)

    def extend(self, when: float) -> None:
        """Move the deadline later: the hot-path case, one attribute write."""
        if self._handle is not None and when >= self._at:
            self._when = when
        else:
            self.set(when)

    def cancel(self) -> None:
        self._when = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def close(self) -> None:
        """Cancel for good and drop the callback (a bound method of the connection that
        owns this timer), so that connection is freed without the cyclic GC."""
        self.cancel()
        self._callback = _nothing

    def _fire(self) -> None:
        self._handle = None
        when = self._when
        if when is None:
            return
        if self._loop.time() < when:  # pushed later since scheduling: sleep again
            self._at = when
            self._handle = self._loop.call_at(when, self._fire)
            return
        self._when = None
        self._callback()


class Outbox:
    """Writes held until the callbacks of this loop iteration have all run, then done
    together: requests read in one iteration reach their upstreams together, and the
    responses that end in one iteration leave together, so each peer wakes once for them
    (measured with 50 keep-alive clients: less system time per request and more requests
    per second than a write as each is ready). One loop callback runs them all: holding
    a write costs a list append, not a loop handle of its own. Its users hold a write only
    while other requests are in flight: alone, there is nothing to batch with."""

    __slots__ = ("_loop", "_writes", "_flushes")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._writes: list = []   # (upstream connection, bytes)
        self._flushes: list = []  # client connections with output queued

    def write(self, conn, data: bytes) -> None:
        """conn.transport.write(data) then, unless conn has closed meanwhile (it was
        cancelled, or lost and its exchange told). conn.held is True until then: bytes
        the peer sends before it cannot be an answer to this write (and a connection that
        closes first stays held: the write never happened)."""
        if not self._writes and not self._flushes:
            self._loop.call_soon(self._run)
        conn.held = True
        self._writes.append((conn, data))

    def flush(self, client) -> None:
        """client.flush() then (the caller holds a flag so a client is added once)."""
        if not self._writes and not self._flushes:
            self._loop.call_soon(self._run)
        self._flushes.append(client)

    def _run(self) -> None:
        writes, self._writes = self._writes, []
        flushes, self._flushes = self._flushes, []
        for conn, data in writes:
            if conn.alive:  # (a closed one stays held: what it was given was never written)
                conn.held = False
                try:
                    conn.transport.write(data)
                except Exception as exc:  # one failed write never holds back the others
                    self._report(exc)
        for client in flushes:
            try:
                client.flush()
            except Exception as exc:
                self._report(exc)

    def _report(self, exc: Exception) -> None:
        self._loop.call_exception_handler({"message": "Outbox write failed", "exception": exc})


# Reasons to stop reading from a transport.
PEER_FULL: Final = 1    # the other side's write buffer is over high water
QUEUED: Final = 2       # pipelined requests wait behind the one in flight
BUFFERING: Final = 4    # request body bytes held while no upstream connection is ready


class ReadGate:
    __slots__ = ("_transport", "reasons")

    def __init__(self, transport: Any = None) -> None:
        # the transport to pause (None until the connection is made: nothing to pause yet).
        # Any: uvloop's transports are not asyncio.Transport instances, which a compiled
        # class would check the value against.
        self._transport = transport
        # Why reading is paused (bits above; 0: reading). Read-only outside: a caller on the
        # hot path tests it to skip a resume() that would do nothing.
        self.reasons = 0

    def attach(self, transport: Any) -> None:
        self._transport = transport

    def pause(self, reason: int) -> None:
        if not self.reasons:
            try:
                self._transport.pause_reading()
            except (RuntimeError, AttributeError):  # closing transport
                pass
        self.reasons |= reason

    def resume(self, reason: int) -> None:
        if self.reasons & reason:
            self.reasons &= ~reason
            if not self.reasons:
                try:
                    self._transport.resume_reading()
                except (RuntimeError, AttributeError):
                    pass

    @property
    def paused(self) -> bool:
        return bool(self.reasons)
