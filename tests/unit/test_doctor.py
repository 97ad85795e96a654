"""Issue 4: `gatewise doctor` pieces that need no upstream: /proc/net/tcp parsing, which
listeners a target address reaches, config smells on hand-built config objects (the
doctor reads attributes only: it never imports proxy), the text rendering, and the
resolve check with an injected resolver (no DNS query leaves this machine)."""

from __future__ import annotations

import asyncio
import re
import socket
import sys
from types import MappingProxyType, SimpleNamespace as NS

import pytest

from diagnostics import ports
from diagnostics.doctor import CHECKS, SEVERITIES, config_smells, finding, is_local_address, render_text, run_doctor
from proxy.config import parse_config

# ---- /proc/net/tcp -------------------------------------------------------------------------

# As printed on a little-endian machine (x86, arm64): 127.0.0.1 reads 0100007F.
TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 1001 1 0 100 0 0 10 0
   1: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1002 1 0 100 0 0 10 0
   2: 0100007F:2328 0100007F:A1B2 01 00000000:00000000 00:00000000 00000000  1000        0 1003 1 0 20 4 30 10 -1
   3: 0200007F:1389 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 1004 1 0 100 0 0 10 0
   4: 0100007F:0BB8 0100007F:1F90 06 00000000:00000000 03:00000F9E 00000000     0        0 0 3 0
garbage line
   5: ZZZZZZZZ:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1005 1 0
"""
TCP6 = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:0BB8 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 2001 1 0 100 0 0 10 0
   1: 00000000000000000000000001000000:232A 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 2002 1 0 100 0 0 10 0
   2: 0000000000000000FFFF00000100007F:1B58 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 2003 1 0 100 0 0 10 0
   3: 000080FE00000000FF00000001000000:0050 000080FE00000000FF00000002000000:C350 01 00000000:00000000 00:00000000 00000000  1000        0 2004 1 0 20 4 30 10 -1
"""
little_endian = pytest.mark.skipif(sys.byteorder != "little", reason="sample text as a little-endian kernel prints it")


@little_endian
def test_parse_ipv4_keeps_only_listening_sockets():
    got = ports.parse_proc_net_tcp(TCP)
    assert got == [ports.Listener(8080, "127.0.0.1", 4), ports.Listener(22, "0.0.0.0", 4),
                   ports.Listener(5001, "127.0.0.2", 4)]
    # established (01) and TIME_WAIT (06) sockets, the header and malformed lines are skipped
    assert 9000 not in {lst.port for lst in got} and 3000 not in {lst.port for lst in got}


@little_endian
def test_parse_ipv6_addresses_including_v4_mapped():
    got = ports.parse_proc_net_tcp(TCP6)
    assert got == [ports.Listener(3000, "::", 6), ports.Listener(9002, "::1", 6),
                   ports.Listener(7000, "::ffff:127.0.0.1", 6)]
    assert [lst.wildcard for lst in got] == [True, False, False]


def test_parse_tolerates_empty_and_junk():
    assert ports.parse_proc_net_tcp("") == []
    assert ports.parse_proc_net_tcp("  sl  local_address\n 0: 0100007F 00000000:0000 0A\n x: y z 0A\n") == []


@little_endian
def test_reachable_on_the_address_itself_or_a_wildcard():
    listeners = ports.parse_proc_net_tcp(TCP) + ports.parse_proc_net_tcp(TCP6)
    # 127.0.0.1: itself, 0.0.0.0, :: (dual stack) and its IPv4-mapped form; not 127.0.0.2, not ::1
    assert ports.reachable_on("127.0.0.1", listeners) == [22, 3000, 7000, 8080]
    assert ports.reachable_on("127.0.0.2", listeners) == [22, 3000, 5001]
    assert ports.reachable_on("::1", listeners) == [3000, 9002]


@little_endian
def test_listening_ports_reads_files_dedups_and_skips_missing(tmp_path):
    (tmp_path / "tcp").write_text(TCP)
    (tmp_path / "tcp6").write_text(TCP6)
    got = ports.listening_ports((str(tmp_path / "tcp"), str(tmp_path / "tcp6"), str(tmp_path / "tcp"),
                                 str(tmp_path / "missing")))
    assert [lst.port for lst in got] == [22, 3000, 5001, 7000, 8080, 9002]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/net/tcp is Linux")
def test_listening_ports_sees_a_real_listener_and_not_a_closed_port():
    with socket.socket() as listener, socket.socket() as bound:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        bound.bind(("127.0.0.1", 0))   # bound, never listening
        port, idle = listener.getsockname()[1], bound.getsockname()[1]
        seen = ports.reachable_on("127.0.0.1", ports.listening_ports())
        assert port in seen and idle not in seen
    assert port not in ports.reachable_on("127.0.0.1", ports.listening_ports())


def test_local_addresses():
    assert is_local_address("127.0.0.1") and is_local_address("127.3.4.5") and is_local_address("::1")
    assert is_local_address("0.0.0.0")
    assert not is_local_address("192.0.2.1")       # TEST-NET-1: never on this machine
    assert not is_local_address("not an ip")


# ---- config smells (hand-built objects: the doctor reads attributes only) --------------------

def server(url, *, weight=1, backup=False, tls_verify=True):
    scheme, rest = url.split("://")
    host, port = rest.rsplit(":", 1)
    return NS(url=url, scheme=scheme, host=host, port=int(port), weight=weight, backup=backup,
              tls_verify=tls_verify, ca_file=None, sni=None)


HEALTH = NS(path="/health", interval=2.0, timeout=1.0, rise=2, fall=3, expect_status=(200, 399))


def config(pools: dict, *, connect=3.0, response_header=30.0):
    return NS(timeouts=NS(connect=connect, response_header=response_header),
              pools=MappingProxyType({name: NS(name=name, **{"retries": 0, "health": HEALTH, "passive": NS(),
                                                             **p}) for name, p in pools.items()}))


def keys(smells):
    return {(s["key"], s["severity"]) for s in smells}


def test_clean_config_has_no_smells():
    cfg = config({"app": {"servers": (server("http://127.0.0.1:9001", weight=3),
                                      server("http://127.0.0.1:9002"))}})
    assert config_smells(cfg) == []


def test_single_server_pool_with_retries():
    cfg = config({"one": {"retries": 2, "servers": (server("http://127.0.0.1:9001"),)},
                  "two": {"retries": 2, "servers": (server("http://127.0.0.1:9002"), server("http://127.0.0.1:9003"))},
                  "zero": {"retries": 0, "servers": (server("http://127.0.0.1:9004"),)}})
    smells = config_smells(cfg)
    assert keys(smells) == {("pools.one.retries", "warning")}
    assert "retries = 2" in smells[0]["message"] and "one server" in smells[0]["message"]


def test_pool_without_health_checks():
    cfg = config({"app": {"health": None, "servers": (server("http://127.0.0.1:9001"),)},
                  "blind": {"health": None, "passive": None, "servers": (server("http://127.0.0.1:9002"),)}})
    smells = config_smells(cfg)
    assert keys(smells) == {("pools.app.health", "warning"), ("pools.blind.health", "warning")}
    assert "passive ejection is off" in smells[1]["message"]
    assert "passive" not in smells[0]["message"]


def test_all_weight_on_one_server():
    heavy = config({"app": {"servers": (server("http://127.0.0.1:9001"), server("http://127.0.0.1:9002", weight=9))}})
    smells = config_smells(heavy)
    assert keys(smells) == {("pools.app.servers[1].weight", "warning")}
    assert "90%" in smells[0]["message"] and "http://127.0.0.1:9002" in smells[0]["message"]
    balanced = config({"app": {"servers": (server("http://127.0.0.1:9001", weight=2),
                                           server("http://127.0.0.1:9002", weight=8))}})
    assert config_smells(balanced) == []        # 80%: a choice, not a smell
    # a backup carries no weight while primaries are up; one primary is simply one primary
    with_backup = config({"app": {"servers": (server("http://127.0.0.1:9001", weight=50),
                                              server("http://127.0.0.1:9002", backup=True))}})
    assert config_smells(with_backup) == []


def test_https_without_verification():
    cfg = config({"app": {"servers": (server("https://10.0.0.1:8443", tls_verify=False),
                                      server("https://10.0.0.2:8443"))}})
    smells = config_smells(cfg)
    assert keys(smells) == {("pools.app.servers[0].tls_verify", "warning")}
    assert "https://10.0.0.1:8443" in smells[0]["message"]


def test_timeouts_shorter_than_observed_latency():
    fast, slow = server("http://127.0.0.1:9001"), server("http://127.0.0.1:9002")
    cfg = config({"app": {"servers": (fast, slow)}}, response_header=0.2)
    smells = config_smells(cfg, {("app", fast.url): 0.001, ("app", slow.url): 0.3})
    assert keys(smells) == {("timeouts.response_header", "error")}
    assert "0.2 s" in smells[0]["message"] and slow.url in smells[0]["message"] and "300" in smells[0]["message"]
    # health.timeout shorter than the latency: checks would fail and mark it down
    cfg = config({"app": {"servers": (fast, slow), "health": NS(**{**vars(HEALTH), "timeout": 0.25})}})
    assert keys(config_smells(cfg, {("app", slow.url): 0.3})) == {("pools.app.health.timeout", "error")}


def test_smells_on_a_loaded_config():
    cfg = parse_config({"pools": {"app": {"servers": [{"url": "http://127.0.0.1:9001"}]}}})
    # defaults: retries 2, no health table
    assert keys(config_smells(cfg)) == {("pools.app.retries", "warning"), ("pools.app.health", "warning")}


# ---- findings and text -------------------------------------------------------------------

def test_finding_shape():
    f = finding("error", "connect", "connection_refused", "connect ECONNREFUSED in 0.2 ms",
                "nothing listens on 127.0.0.1:9002", "start it")
    assert list(f) == ["severity", "check", "error", "observed", "likely_cause", "next_step"]
    assert finding("info", "http", None, "GET / -> 200", suggestion="http://x:1")["suggestion"] == "http://x:1"
    with pytest.raises(AssertionError):
        finding("fatal", "connect", None, "x")
    assert set(SEVERITIES) == {"error", "warning", "info"}
    assert set(CHECKS) == {"resolve", "connect", "tls", "http", "latency", "config"}


REPORT = {
    "ok": False,
    "servers": [
        {"pool": "app", "url": "http://127.0.0.1:9001", "ok": True, "findings": [
            finding("info", "connect", None, "connected to 127.0.0.1:9001 in 0.2 ms"),
            finding("info", "http", None, "GET /health -> 200 OK in 1.0 ms")]},
        {"pool": "app", "url": "http://127.0.0.1:9002", "ok": False, "findings": [
            finding("error", "connect", "connection_refused",
                    "connect ECONNREFUSED in 0.2 ms: nothing listens on 127.0.0.1:9002; something listens on 9001",
                    "nothing listens on 127.0.0.1:9002", "start the service, or point the config at the port it uses",
                    "http://127.0.0.1:9001")]},
        {"pool": "slowpool", "url": "http://127.0.0.1:9003", "ok": False, "findings": [
            finding("warning", "latency", None, "GET / -> 200 in 20 s, more than half of timeouts.response_header",
                    "close to the timeout", "give it headroom")]},
    ],
    "config": [{"severity": "warning", "key": "pools.app.retries", "message": "retries = 2 on a pool with one server"},
               {"severity": "error", "key": "timeouts.response_header", "message": "too short"}],
}
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def test_render_text_plain_is_aligned_and_has_every_part():
    text = render_text(REPORT, color=False)
    assert "\x1b" not in text
    lines = text.splitlines()
    split = lines.index("config")
    row = re.compile(r"  (ok|WARN|ERROR)\s")
    # severity, check/key and message start in the same columns on every finding row
    server_rows = [line for line in lines[:split] if row.match(line)]
    config_rows = [line for line in lines[split:] if row.match(line)]
    assert len(server_rows) == 4 and len(config_rows) == 2
    cols = re.compile(r"  (\S+)\s+(\S+)\s+(\S)")
    assert len({(cols.match(r).start(2), cols.match(r).start(3)) for r in server_rows}) == 1
    assert len({(cols.match(r).start(2), cols.match(r).start(3)) for r in config_rows}) == 1
    for needle in ("http://127.0.0.1:9002", "FAILED", "[connection_refused]", "cause:", "next:",
                   "try:   http://127.0.0.1:9001", "pools.app.retries", "2 errors, 2 warnings", "problems found (exit 1)"):
        assert needle in text, needle
    # continuation lines (cause/next/try) line up under the observed text
    refused = next(r for r in server_rows if "ECONNREFUSED" in r)
    col = refused.index("connect ECONNREFUSED")
    for tag in ("cause:", "next:", "try:"):
        assert next(line for line in lines if tag in line).index(tag) == col


def test_render_text_colour_is_the_same_text_plus_sgr():
    plain = render_text(REPORT, color=False)
    coloured = render_text(REPORT, color=True)
    assert "\x1b[31m" in coloured and "\x1b[33m" in coloured and "\x1b[32m" in coloured
    assert ANSI.sub("", coloured) == plain


def test_render_text_clean_report():
    report = {"ok": True, "servers": [REPORT["servers"][0]], "config": []}
    text = render_text(report, color=False)
    assert "nothing is wrong (exit 0)" in text and "config" not in text and "FAILED" not in text


# ---- resolve with an injected resolver ---------------------------------------------------

def named(host="db.internal", port=9001):
    return config({"app": {"servers": (NS(url=f"http://{host}:{port}", scheme="http", host=host, port=port,
                                          weight=1, backup=False, tls_verify=True, ca_file=None, sni=None),)}},
                  connect=0.2)


async def test_dns_error_from_the_resolver():
    async def nxdomain(host, port):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    report = await run_doctor(named(), resolver=nxdomain)
    assert report["ok"] is False
    [f] = report["servers"][0]["findings"]
    assert (f["severity"], f["check"], f["error"]) == ("error", "resolve", "dns_error")
    assert "db.internal" in f["observed"] and "NXDOMAIN" in f["observed"]
    assert "getent hosts db.internal" in f["next_step"]


async def test_dns_timeout_is_bounded_by_timeouts_connect():
    async def silent(host, port):
        await asyncio.sleep(30)

    loop = asyncio.get_running_loop()
    started = loop.time()
    report = await run_doctor(named(), resolver=silent)
    assert loop.time() - started < 2
    [f] = report["servers"][0]["findings"]
    assert (f["severity"], f["check"], f["error"]) == ("error", "resolve", "dns_timeout")
    assert "timeouts.connect = 0.2 s" in f["observed"]


async def test_resolved_name_is_used_and_reported():
    async def answer(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    asked = []

    async def hosts_file(host, port):
        asked.append((host, port))
        return ["127.0.0.1"]

    try:
        report = await run_doctor(named("app.internal", port), resolver=hosts_file)
    finally:
        server.close()
        await server.wait_closed()
    assert asked == [("app.internal", port)]
    checks = [(f["check"], f["severity"]) for f in report["servers"][0]["findings"]]
    assert checks == [("resolve", "info"), ("connect", "info"), ("http", "info")]
    assert report["servers"][0]["ok"] is True
    assert "app.internal -> 127.0.0.1" in report["servers"][0]["findings"][0]["observed"]


async def test_clock_is_injectable():
    ticks = iter(range(0, 1000, 5))

    async def nxdomain(host, port):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    report = await run_doctor(named(), resolver=nxdomain, now=lambda: next(ticks))
    assert report["servers"][0]["findings"][0]["observed"].endswith("after 5.00 s")


def test_an_empty_pool_is_an_error_smell():
    from proxy.config import parse_config
    from diagnostics.doctor import config_smells

    cfg = parse_config({"pools": {"empty": {"servers": []}}, "routes": [{"pool": "empty"}]})
    (smell,) = [s for s in config_smells(cfg) if s["key"] == "pools.empty.servers"]
    assert smell["severity"] == "error" and "proxy_configuration_error" in smell["message"]
