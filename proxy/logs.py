"""Structured logs: one JSON object per line on stderr (orjson).

One line per failed request and per lifecycle event; nothing per successful request
(an access log would be an opt-in feature), so the hot path never formats a log line.
"""

from __future__ import annotations

import sys
import time

import orjson


# Fields added to every line of this process (a worker adds {"worker": index}).
context: dict = {}


def log_server_state(pool: str, server, change, **fields) -> None:
    """The one line per server state transition ("server_state"), from whichever judge
    made it: a health check, live traffic, a trial request. `change` is servers.py's
    (old, new) or None (steady state: nothing to log)."""
    if change is not None:
        log_event("server_state", pool=pool, server=server.address, old=str(change[0]), new=str(change[1]),
                  reason=server.eject_reason or None, **fields)


def log_event(event: str, **fields) -> None:
    record = {"ts": round(time.time(), 3), "event": event}
    record.update(context)
    record.update(fields)
    try:
        sys.stderr.buffer.write(orjson.dumps(record, default=str) + b"\n")
        sys.stderr.flush()
    except (ValueError, OSError):  # stderr closed: logging must never break serving
        pass
