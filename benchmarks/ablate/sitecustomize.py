"""Ablation stubs for `benchmarks/profile.py --ablate NAME[,NAME...]`: what a component of the
hot path costs, as the drop in instructions per request when it is stubbed out.

profile.py puts this directory first on the proxy's PYTHONPATH and sets ABLATE, so Python
imports this module at startup (site.py imports any `sitecustomize`) and it monkeypatches
gatewise before the proxy starts. Each stub keeps requests flowing but skips the work:
the proxy then answers GET / wrongly (cached heads, no statistics, no timers), which is
fine for counting and nothing else. Never on a PYTHONPATH outside profile.py.

    stats        ServerState.on_success/on_attempt_start/on_attempt_end, Histogram.observe
    timers       Deadline.set/extend
    routing      split_target, rewrite_target, Router.match (cached)
    reqheaders   scan_request and build_request_head (first result reused)
    respheaders  plan_response (first result reused)
    defer        upstream writes and client flushes at once instead of per loop iteration
"""
import os

NAMES = ("stats", "timers", "routing", "reqheaders", "respheaders", "defer")
ABLATE = set(filter(None, os.environ.get("ABLATE", "").split(",")))
if ABLATE - set(NAMES):
    raise SystemExit(f"ABLATE: {', '.join(sorted(ABLATE - set(NAMES)))} not in {', '.join(NAMES)}")

if ABLATE:
    import proxy.servers as S
    import proxy.flow as F
    import proxy.forward as FW
    import proxy.headers as H
    import proxy.upstream_conn as UC
    import proxy.downstream as D
    import proxy.stats as M

    if "stats" in ABLATE:
        S.ServerState.on_success = lambda self, status, secs, trial=False: None
        S.ServerState.on_attempt_start = lambda self: False
        S.ServerState.on_attempt_end = lambda self, trial: None
        M.Histogram.observe = lambda self, v: None
        FW._observe_latency = lambda ex: None
    if "timers" in ABLATE:
        F.Deadline.set = lambda self, when: None
        F.Deadline.extend = lambda self, when: None
    if "routing" in ABLATE:
        FW.split_target = lambda target: (None, target)
        FW.rewrite_target = lambda route, path: path
        import proxy.router as R
        _match = R.Router.match
        _cache = {}
        def match(self, host, path):
            r = _cache.get(id(self))
            if r is None:
                r = _cache[id(self)] = _match(self, host, path)
            return r
        R.Router.match = match
    if "reqheaders" in ABLATE:
        # the scan fills the head's own slots: the stub copies the first request's (a few
        # stores, not free, so this slightly understates what the scan costs)
        from proxy.codec.base import RequestHead
        _scan, _build = H.scan_request, H.build_request_head
        _slots = tuple(RequestHead.__annotations__)  # the slots the scan fills (declared apart)
        _c = {}
        def scan(head, name):
            if "i" not in _c:
                _c["i"] = [getattr(_scan(head, name), s) for s in _slots]
            else:
                for slot, value in zip(_slots, _c["i"]):
                    setattr(head, slot, value)
            return head
        def build(head, **kw):
            if "b" not in _c:
                _c["b"] = _build(head, **kw)
            return _c["b"]
        H.scan_request = scan
        H.build_request_head = build
    if "respheaders" in ABLATE:
        _plan = H.plan_response
        _p = {}
        def plan(head, **kw):
            if "p" not in _p:
                _p["p"] = _plan(head, **kw)
            return _p["p"]
        H.plan_response = plan
    if "defer" in ABLATE:
        _begin = UC.UpstreamConnection.begin
        UC.UpstreamConnection.begin = lambda self, ex, m, d, c, u=False, later=False: _begin(self, ex, m, d, c, u, False)
        D.DownstreamProtocol.flush_soon = D.DownstreamProtocol.flush
