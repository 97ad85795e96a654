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


def log_event(event: str, **fields) -> None:
    record = {"ts": round(time.time(), 3), "event": event}
    record.update(context)
    record.update(fields)
    try:
        sys.stderr.buffer.write(orjson.dumps(record, default=str) + b"\n")
        sys.stderr.flush()
    except (ValueError, OSError):  # stderr closed: logging must never break serving
        pass
