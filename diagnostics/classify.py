"""Exception -> exactly one Cause.

proxy/errors.py leaves carry their cause (duck-typed here, so diagnostics never imports
proxy); anything else that escapes is, by definition, a bug in gatewise.
"""

from __future__ import annotations

from diagnostics.causes import Cause


def classify(exc: BaseException) -> Cause:
    cause = getattr(type(exc), "cause", None)
    return cause if isinstance(cause, Cause) else Cause.PROXY_INTERNAL
