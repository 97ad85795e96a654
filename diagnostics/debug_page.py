"""`/debug`: one HTML page for a person who wants to know what the proxy sees, right now.

Top to bottom: a summary line (servers by state, pools with nothing available), one card
per pool with a row per server (state, weight, load, latency, last check, last failure and
why it is out), then the most recent failed requests with their attempt chains, each id
linking to its JSON evidence at /debug/requests/<id>. It reloads itself every 2 s.

Rules:
- Every interpolated value goes through `html.escape` (request paths, error details and
  server URLs come from the network or the config). Ids in links are percent-encoded first.
- Self-contained: inline CSS, no scripts, no external assets (the admin listener may be
  the only thing reachable when things are on fire).
- Tolerant input: any field may be missing or null and unknown keys are ignored, so a
  newer proxy never breaks the page. A state is shown as text as well as colour.
- Pure: `now` comes in; no I/O, never imports `proxy`.
"""

from __future__ import annotations

import html
import time
from urllib.parse import quote

REFRESH_SECONDS = 2
MAX_REQUESTS = 50

_STATE_CLASS = {"healthy": "healthy", "unknown": "unknown", "unhealthy": "unhealthy",
                "ejected": "ejected"}
_AVAILABLE = frozenset({"healthy", "unknown"})

_CSS = """
:root{--bg:#f6f8fa;--card:#fff;--fg:#1f2328;--muted:#656d76;--line:#d0d7de;
--healthy:#1a7f37;--unknown:#6e7781;--unhealthy:#cf222e;--ejected:#d4720b;--link:#0969da}
@media (prefers-color-scheme:dark){:root{--bg:#0d1117;--card:#161b22;--fg:#e6edf3;
--muted:#8d96a0;--line:#30363d;--healthy:#3fb950;--unknown:#8d96a0;--unhealthy:#f85149;
--ejected:#f0883e;--link:#58a6ff}}
*{box-sizing:border-box}
body{margin:0;padding:20px 28px;background:var(--bg);color:var(--fg);
font:14px/1.45 -apple-system,BlinkMacSystemFont,"Segoe UI",Helvetica,Arial,sans-serif}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:0}
a{color:var(--link);text-decoration:none}a:hover{text-decoration:underline}
code,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12.5px}
.muted{color:var(--muted)}.small{font-size:12px}
header{margin-bottom:16px}.summary{margin-top:6px}
.alert{background:color-mix(in srgb,var(--unhealthy) 14%,var(--card));
border:1px solid var(--unhealthy);border-radius:6px;padding:8px 12px;margin:10px 0}
section.card{background:var(--card);border:1px solid var(--line);border-radius:8px;
margin:0 0 18px;overflow:hidden}
.card>.head{display:flex;gap:12px;align-items:baseline;padding:10px 14px;
border-bottom:1px solid var(--line)}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;vertical-align:top;padding:7px 14px;border-bottom:1px solid var(--line)}
th{font-size:12px;font-weight:600;color:var(--muted);white-space:nowrap}
tr:last-child td{border-bottom:0}
td.num{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}
.pill{display:inline-block;min-width:78px;text-align:center;border-radius:999px;padding:1px 9px;
font-size:12px;font-weight:600;color:#fff;background:var(--unknown)}
.pill.healthy{background:var(--healthy)}.pill.unhealthy{background:var(--unhealthy)}
.pill.ejected{background:var(--ejected)}.pill.unknown{background:var(--unknown)}
tr.state-unhealthy td:first-child{box-shadow:inset 4px 0 var(--unhealthy)}
tr.state-ejected td:first-child{box-shadow:inset 4px 0 var(--ejected)}
tr.state-healthy td:first-child{box-shadow:inset 4px 0 var(--healthy)}
tr.state-unknown td:first-child{box-shadow:inset 4px 0 var(--unknown)}
.badge{display:inline-block;border:1px solid var(--line);border-radius:4px;padding:0 5px;
font-size:11px;color:var(--muted);margin-left:6px}
.err{color:var(--unhealthy);font-weight:600}
.chain{margin:0;padding:0;list-style:none}.chain li{margin:1px 0}
.chain .arrow{color:var(--muted);margin-right:4px}
.details{max-width:520px;overflow-wrap:anywhere}
footer{margin-top:18px}
"""


def _e(value: object) -> str:
    return "—" if value is None or value == "" else html.escape(str(value), quote=True)


def _age(t: object, now: float) -> str:
    if not isinstance(t, int | float) or isinstance(t, bool):
        return "never"
    d = now - t
    if d < 1:
        return "just now"
    if d < 120:
        return f"{d:.0f} s ago"
    if d < 7200:
        return f"{d / 60:.0f} min ago"
    if d < 172800:
        return f"{d / 3600:.0f} h ago"
    return f"{d / 86400:.0f} d ago"


def _utc(t: object) -> str:
    if not isinstance(t, int | float) or isinstance(t, bool):
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _when(t: object, now: float) -> str:
    return f'<span title="{_e(_utc(t))}">{_e(_age(t, now))}</span>'


def _ms(value: object) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "—"
    if value >= 1000:
        return f"{value / 1000:.2f} s"
    if value >= 10:
        return f"{value:.0f} ms"
    return f"{value:.2g} ms" if value < 1 else f"{value:.1f} ms"


def _int(value: object) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else "—"


def _pill(state: object) -> str:
    cls = _STATE_CLASS.get(state, "unknown") if isinstance(state, str) else "unknown"
    return f'<span class="pill {cls}">{_e(state or "unknown")}</span>'


def _last_check(health: object, now: float) -> str:
    if not isinstance(health, dict) or health.get("last_check") is None:
        return '<span class="muted">no active check</span>'
    parts = [_when(health.get("last_check"), now)]
    if health.get("last_status") is not None:
        parts.append(f"status {_e(health.get('last_status'))}")
    if health.get("latency_ms") is not None:
        parts.append(_ms(health.get("latency_ms")))
    line = " · ".join(parts)
    if health.get("last_error"):
        line += f'<br><span class="err">{_e(health.get("last_error"))}</span>'
    ok, bad = health.get("consecutive_successes"), health.get("consecutive_failures")
    if ok or bad:
        line += f'<br><span class="muted small">{_int(ok or 0)} ok / {_int(bad or 0)} failed in a row</span>'
    return line


def _last_failure(server: dict, now: float) -> str:
    parts = []
    reason = server.get("reason")
    if reason:
        parts.append(f"<div><b>out:</b> {_e(reason)}</div>")
    failure = server.get("last_failure")
    if isinstance(failure, dict):
        parts.append(f'<div><span class="err">{_e(failure.get("error"))}</span> '
                     f'{_when(failure.get("at"), now)}</div>')
        if failure.get("details"):
            parts.append(f'<div class="muted small details">{_e(failure.get("details"))}</div>')
    by_error = server.get("failures_by_error")
    if isinstance(by_error, dict) and by_error:
        counts = ", ".join(f"{_e(k)} ×{_e(v)}" for k, v in sorted(by_error.items(), key=lambda kv: str(kv[0])))
        parts.append(f'<div class="muted small">{counts}</div>')
    return "".join(parts) or '<span class="muted">none</span>'


def _server_row(server: dict, now: float) -> str:
    state = server.get("state")
    cls = _STATE_CLASS.get(state, "unknown") if isinstance(state, str) else "unknown"
    badges = f'<span class="badge">weight {_e(server.get("weight"))}</span>'
    if server.get("backup"):
        badges += '<span class="badge">backup</span>'
    latency = server.get("latency_ms") if isinstance(server.get("latency_ms"), dict) else {}
    total, failed = server.get("requests_total"), server.get("failures_total")
    rate = ""
    if isinstance(total, int) and isinstance(failed, int) and total > 0 and failed > 0:
        rate = f' <span class="muted small">({100 * failed / total:.1f}%)</span>'
    return (f'<tr class="state-{cls}"><td>{_pill(state)}</td>'
            f'<td><span class="mono">{_e(server.get("url"))}</span>{badges}</td>'
            f'<td class="num">{_int(server.get("active_requests"))}</td>'
            f'<td class="num">{_int(server.get("idle_connections"))}</td>'
            f'<td class="num">{_int(total)}</td>'
            f'<td class="num">{_int(failed)}{rate}</td>'
            f'<td class="num">{_ms(latency.get("p50"))} / {_ms(latency.get("p99"))}</td>'
            f"<td>{_last_check(server.get('health'), now)}</td>"
            f"<td>{_last_failure(server, now)}</td></tr>")


def _pool_card(name: str, pool: dict, now: float) -> str:
    servers = [s for s in (pool.get("servers") or ()) if isinstance(s, dict)]
    available = sum(1 for s in servers if s.get("state") in _AVAILABLE)
    rows = "".join(_server_row(s, now) for s in servers) or \
        '<tr><td colspan="9" class="muted">no servers</td></tr>'
    return (f'<section class="card" id="pool-{_e(name)}"><div class="head"><h2>pool {_e(name)}</h2>'
            f'<span class="muted">{_e(pool.get("balance"))} · {available} of {len(servers)} '
            f'available</span></div><table><thead><tr><th>state</th><th>server</th>'
            f'<th>active</th><th>idle conns</th><th>requests</th><th>failures</th>'
            f'<th>p50 / p99</th><th>last check</th><th>last failure</th></tr></thead>'
            f"<tbody>{rows}</tbody></table></section>")


def _attempts(attempts: object) -> str:
    if not isinstance(attempts, list) or not attempts:
        return '<span class="muted">no upstream attempt</span>'
    items = []
    for i, a in enumerate(a for a in attempts if isinstance(a, dict)):
        arrow = '<span class="arrow">→</span>' if i else '<span class="arrow">1.</span>'
        error = f'<span class="err">{_e(a.get("error"))}</span>' if a.get("error") else "ok"
        details = f' <span class="muted small details">{_e(a.get("details"))}</span>' if a.get("details") else ""
        items.append(f'<li>{arrow}<span class="mono">{_e(a.get("server"))}</span> {error} '
                     f'<span class="muted">({_ms(a.get("elapsed_ms"))})</span>{details}</li>')
    return f'<ol class="chain">{"".join(items)}</ol>'


def _request_row(r: dict, now: float) -> str:
    rid = r.get("request_id")
    link = (f'<a class="mono" href="/debug/requests/{_e(quote(str(rid), safe=""))}">{_e(rid)}</a>'
            if rid else "—")
    return (f"<tr><td>{_when(r.get('at'), now)}</td><td>{link}</td>"
            f'<td><span class="mono">{_e(r.get("method"))} {_e(r.get("path"))}</span></td>'
            f'<td class="num">{_e(r.get("status"))}</td>'
            f'<td><span class="err">{_e(r.get("error"))}</span>'
            f'<div class="muted small details">{_e(r.get("details")) if r.get("details") else ""}</div></td>'
            f"<td>{_attempts(r.get('attempts'))}</td></tr>")


def _summary(pools: dict) -> tuple[str, str]:
    counts = {"healthy": 0, "unknown": 0, "unhealthy": 0, "ejected": 0}
    dead = []
    for name, pool in pools.items():
        servers = [s for s in ((pool or {}).get("servers") or ()) if isinstance(s, dict)]
        for s in servers:
            state = s.get("state")
            key = state if state in counts else "unknown"
            counts[key] += 1
        if servers and not any(s.get("state") in _AVAILABLE for s in servers):
            dead.append(name)
    summary = " · ".join(f'<span class="pill {k}">{v} {k}</span>' for k, v in counts.items())
    alert = ""
    if dead:
        names = ", ".join(_e(n) for n in dead)
        alert = (f'<div class="alert"><b>No server available</b> in pool {names}: requests routed '
                 f"there get 503 destination_unavailable.</div>")
    return summary, alert


def _workers_note(workers: list[dict] | None) -> str:
    """With listen.workers > 1, which processes the figures are summed over."""
    if not workers or len(workers) < 2:
        return ""
    parts = ", ".join(f"{_e(w.get('index'))}: pid {_e(w.get('pid'))}"
                      + ("" if w.get("alive") else " (down)")
                      + (f", {_int(w.get('restarts'))} restarts" if w.get("restarts") else "")
                      for w in workers)
    return f" · {len(workers)} workers, figures summed ({parts})"


def render_debug_page(upstreams: dict, requests: list[dict], now: float,
                      workers: list[dict] | None = None) -> str:
    """The whole page. `upstreams` is the /debug/upstreams document, `requests` the recent
    failed requests newest first (only the first MAX_REQUESTS are shown), `workers` the
    /debug/workers list."""
    pools = (upstreams or {}).get("pools") or {}
    summary, alert = _summary(pools)
    cards = "".join(_pool_card(str(name), pool or {}, now) for name, pool in pools.items()) or \
        '<p class="muted">No pools configured.</p>'
    shown = [r for r in (requests or ())[:MAX_REQUESTS] if isinstance(r, dict)]
    if shown:
        rows = "".join(_request_row(r, now) for r in shown)
        failures = (f'<section class="card"><table><thead><tr><th>when</th><th>request id</th>'
                    f"<th>request</th><th>status</th><th>error</th><th>attempts</th></tr></thead>"
                    f"<tbody>{rows}</tbody></table></section>")
    else:
        failures = '<p class="muted">No failed requests recorded. Only failures are kept.</p>'
    more = len(requests or ()) - len(shown)
    more_note = f' <span class="muted small">(newest {len(shown)}; {more} more at ' \
                f'<a href="/debug/requests">/debug/requests</a>)</span>' if more > 0 else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH_SECONDS}">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>gatewise · what the proxy sees</title><style>{_CSS}</style></head>
<body><header><h1>gatewise · what the proxy sees</h1>
<div class="muted small">{_e(_utc(now))} · refreshes every {REFRESH_SECONDS} s ·
JSON: <a href="/debug/upstreams">upstreams</a> · <a href="/debug/requests">requests</a> ·
<a href="/debug/config">config</a> · <a href="/debug/workers">workers</a> ·
<a href="/metrics">metrics</a>{_workers_note(workers)}</div>
<div class="summary">{summary}</div>{alert}</header>
<main>{cards}
<h2 style="margin:22px 0 10px">Recent failed requests{more_note}</h2>
{failures}</main>
<footer class="muted small">Times are relative to the page render; hover for UTC.</footer>
</body></html>
"""
