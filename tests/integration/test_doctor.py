"""Issue 4: `gatewise doctor` against real upstreams on loopback.

- The CLI as a user runs it (`python -m proxy doctor -c FILE --json`, a subprocess):
  one good server, one refused port next to a listening one, one slow server and one
  TLS mismatch -> each problem with its check and RFC 9209 token, the listening port
  suggested, exit 1; a clean config exits 0; piped text output has no colour.
- In-process run_doctor: TLS certificate problems (self-signed, expired, unknown CA,
  name mismatch) with real certificates (tests/tlsutil.py), sni honoured, plain HTTP
  on an https:// port, a real TLS server behind an http:// URL, connect timeout, no
  response head.
- /debug/doctor through a running proxy returns the same report.
"""

from __future__ import annotations

import asyncio
import re
import socket
import sys

import aiohttp
import orjson
import pytest

from diagnostics import ports
from diagnostics.doctor import run_doctor
from proxy.config import parse_config
from tests.procs import ROOT
from tests.tlsutil import pki, server_context  # noqa: F401  (pki: a session fixture)

FINDING_KEYS = {"severity", "check", "error", "observed", "likely_cause", "next_step"}


def assert_spec_shape(report: dict) -> None:
    """SPEC "Doctor": exactly these keys, these enumerations."""
    assert set(report) == {"ok", "servers", "config"}
    for server in report["servers"]:
        assert set(server) == {"pool", "url", "ok", "findings"}
        assert server["ok"] == (not any(f["severity"] == "error" for f in server["findings"]))
        for f in server["findings"]:
            assert FINDING_KEYS <= set(f) <= FINDING_KEYS | {"suggestion"}, f
            assert f["severity"] in ("error", "warning", "info")
            assert f["check"] in ("resolve", "connect", "tls", "http", "latency", "config")
            assert f["error"] is None or re.fullmatch(r"[a-z][a-z0-9_]*", f["error"])
            assert isinstance(f["observed"], str) and f["observed"]
    for c in report["config"]:
        assert set(c) == {"severity", "key", "message"}
        assert c["severity"] in ("error", "warning", "info")


def by_url(report: dict, url: str) -> dict:
    [server] = [s for s in report["servers"] if s["url"] == url]
    return server


def errors(server: dict) -> list[dict]:
    return [f for f in server["findings"] if f["severity"] == "error"]


def toml_config(urls: list[str], *, response_header: float = 30.0, health: bool = True, retries: int = 0) -> str:
    lines = ["[timeouts]", "connect = 1.0", f"response_header = {response_header}", "",
             "[pools.app]", f"retries = {retries}"]
    if health:
        lines += ["[pools.app.health]", 'path = "/health"', "timeout = 1.0"]
    for url in urls:
        lines += ["[[pools.app.servers]]", f'url = "{url}"']
    return "\n".join(lines) + "\n"


async def doctor_cli(path, *args: str, timeout: float = 60.0) -> tuple[int, str, str]:
    """`python -m proxy doctor -c path ...` while this loop keeps serving the upstreams."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "proxy", "doctor", "-c", str(path), *args,
                                                cwd=ROOT, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode, out.decode(), err.decode()


def free_neighbour(live: int) -> int | None:
    """A closed port next to `live` with nothing listening as close on its other side, so
    `live` is unambiguously the nearest listener (bind-then-close proves it is free)."""
    listening = set(ports.reachable_on("127.0.0.1", ports.listening_ports()))
    for dead in (live + 1, live - 1):
        far = dead + (dead - live)
        if not 1024 < dead < 65535 or dead in listening or far in listening:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", dead))
        except OSError:
            continue
        return dead
    return None


# ---- the CLI -------------------------------------------------------------------------------

async def test_cli_json_names_each_problem_and_suggests_the_listening_port(upstream, tmp_path):
    for _ in range(10):
        good = await upstream("ok")
        dead = free_neighbour(good.port)
        if dead is not None:
            break
    else:
        pytest.skip("no free port next to a listening one")
    slow = await upstream("slow:0.3")
    tls = await upstream("tls")          # answers plaintext with a TLS alert record
    refused = f"http://127.0.0.1:{dead}"
    config = tmp_path / "doctor.toml"
    config.write_text(toml_config([good.url, refused, slow.url, tls.url], response_header=0.2))

    code, out, err = await doctor_cli(config, "--json")
    assert code == 1, err
    report = orjson.loads(out)
    assert_spec_shape(report)
    assert report["ok"] is False
    assert [s["url"] for s in report["servers"]] == [good.url, refused, slow.url, tls.url]
    assert {s["pool"] for s in report["servers"]} == {"app"}

    ok = by_url(report, good.url)
    assert ok["ok"] is True and errors(ok) == []
    assert any(f["check"] == "http" and "200" in f["observed"] for f in ok["findings"])

    [f] = errors(by_url(report, refused))
    assert (f["check"], f["error"]) == ("connect", "connection_refused")
    assert "ECONNREFUSED" in f["observed"] and f"nothing listens on 127.0.0.1:{dead}" in f["observed"]
    listed = re.search(r"something listens on ([0-9, ]+)", f["observed"])[1]
    assert str(good.port) in listed.replace(" ", "").split(",")
    assert f["suggestion"] == good.url
    assert f["likely_cause"] and f["next_step"]

    [f] = errors(by_url(report, slow.url))
    assert (f["check"], f["error"]) == ("latency", "http_response_timeout")
    assert "timeouts.response_header = 0.2 s" in f["observed"]
    assert int(re.search(r"after (\d+)", f["observed"])[1]) >= 300

    [f] = errors(by_url(report, tls.url))
    assert (f["check"], f["error"]) == ("http", "http_protocol_error")
    assert "speaks TLS: use https://" in f["observed"]
    assert f["suggestion"] == f"https://{tls.address}"

    assert {"severity": "error", "key": "timeouts.response_header"}.items() <= \
        next(c for c in report["config"] if c["key"] == "timeouts.response_header").items()


async def test_cli_clean_config_exits_0_and_pipes_plain_text(upstream, tmp_path):
    ok = await upstream("ok")
    config = tmp_path / "clean.toml"
    config.write_text(toml_config([ok.url], health=True, retries=0))

    code, out, err = await doctor_cli(config, "--json")
    assert code == 0, (out, err)
    report = orjson.loads(out)
    assert_spec_shape(report)
    assert report["ok"] is True and report["config"] == []
    [server] = report["servers"]
    assert server["ok"] is True
    assert [f["check"] for f in server["findings"]] == ["connect", "http"]
    assert "GET /health -> 200" in server["findings"][1]["observed"]

    code, out, err = await doctor_cli(config)          # stdout is a pipe: no colour
    assert code == 0, err
    assert "\x1b" not in out
    assert ok.url in out and "nothing is wrong (exit 0)" in out


async def test_cli_bad_config_exits_1_naming_the_key(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('[pools.app]\nretries = -1\n[[pools.app.servers]]\nurl = "http://127.0.0.1:1"\n')
    code, out, err = await doctor_cli(config, "--json")
    assert code == 1 and out == ""
    assert "pools.app.retries" in err


# ---- TLS ---------------------------------------------------------------------------------

def tls_config(servers: list[dict], **timeouts) -> object:
    return parse_config({"timeouts": {"connect": 1.0, **timeouts},
                         "pools": {"app": {"retries": 0, "health": {"path": "/health"}, "servers": servers}}})


async def test_tls_certificate_problems_each_say_what_is_wrong(upstream, pki):
    ca = str(pki.ca)
    ups = {name: await upstream("ok", ssl=server_context(getattr(pki, name)))
           for name in ("good", "self_signed", "expired", "other_ca_signed", "wrong_name")}
    url = {name: f"https://localhost:{up.port}" for name, up in ups.items()}
    sni = f"https://127.0.0.1:{ups['wrong_name'].port}"
    cfg = tls_config([{"url": u, "ca_file": ca} for u in url.values()]
                     + [{"url": sni, "ca_file": ca, "sni": "other.example"}])
    report = await run_doctor(cfg)
    assert_spec_shape(report)

    good = by_url(report, url["good"])
    assert good["ok"] is True
    tls = next(f for f in good["findings"] if f["check"] == "tls")
    assert "certificate verified for localhost" in tls["observed"] and "TLS" in tls["observed"]
    assert any(f["check"] == "http" and "GET /health -> 200" in f["observed"] for f in good["findings"])

    for name, words in (("self_signed", "self-signed"), ("expired", "expired"),
                        ("other_ca_signed", "unknown CA"), ("wrong_name", "name mismatch")):
        [f] = errors(by_url(report, url[name]))
        assert (f["check"], f["error"]) == ("tls", "tls_certificate_error"), name
        assert words in f["observed"], (name, f["observed"])
        assert f["likely_cause"] and f["next_step"]
    [f] = errors(by_url(report, url["wrong_name"]))
    assert "localhost" in f["likely_cause"] and "sni" in f["next_step"]

    # sni names the certificate's host: the same server verifies
    assert by_url(report, sni)["ok"] is True


async def test_tls_mismatch_both_ways(upstream, pki):
    plain = await upstream("ok")
    secure = await upstream("ok", ssl=server_context(pki.good))
    unverified = await upstream("ok", ssl=server_context(pki.self_signed))
    https_on_plain = f"https://{plain.address}"
    http_on_tls = f"http://{secure.address}"
    cfg = tls_config([{"url": https_on_plain}, {"url": http_on_tls},
                      {"url": unverified.url, "tls_verify": False}])
    report = await run_doctor(cfg)
    assert_spec_shape(report)

    [f] = errors(by_url(report, https_on_plain))
    assert (f["check"], f["error"]) == ("tls", "tls_protocol_error")
    assert "speaks plain HTTP: use http://" in f["observed"]
    assert f["suggestion"] == plain.url

    # a real TLS server given plain HTTP (it may close without a byte): still named
    [f] = errors(by_url(report, http_on_tls))
    assert (f["check"], f["error"]) == ("http", "http_protocol_error")
    assert "speaks TLS: use https://" in f["observed"]
    assert f["suggestion"] == secure.url

    # verification off: it works, and the config list says why that is a smell
    assert by_url(report, unverified.url)["ok"] is True
    assert [c["key"] for c in report["config"]] == ["pools.app.servers[2].tls_verify"]


# ---- connect timeout, no answer ----------------------------------------------------------

async def test_connect_timeout_and_no_response_head(upstream):
    hole = await upstream("blackhole")
    hang = await upstream("hang")
    cfg = parse_config({"timeouts": {"connect": 0.3, "response_header": 0.2},
                        "pools": {"app": {"retries": 0, "health": {"path": "/health"},
                                          "servers": [{"url": hole.url}, {"url": hang.url}]}}})
    loop = asyncio.get_running_loop()
    started = loop.time()
    report = await run_doctor(cfg)
    assert loop.time() - started < 5          # every phase is bounded
    assert_spec_shape(report)

    [f] = errors(by_url(report, hole.url))
    assert (f["check"], f["error"]) == ("connect", "connection_timeout")
    assert "timeouts.connect = 0.3 s" in f["observed"]

    [f] = errors(by_url(report, hang.url))
    assert (f["check"], f["error"]) == ("http", "http_response_timeout")
    assert "no response head" in f["observed"]


# ---- /debug/doctor -----------------------------------------------------------------------

@pytest.mark.parametrize("parser", ["llhttp"])
async def test_debug_doctor_through_a_running_proxy(upstream, gateway):
    ok = await upstream("ok")
    slow = await upstream("slow:0.3")
    gw = await gateway([ok, slow], pool={"retries": 0, "health": {"path": "/health", "interval": 5.0}},
                       timeouts={"response_header": 0.2})
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{gw.admin.port}/debug/doctor") as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("application/json")
            report = orjson.loads(await r.read())
    assert_spec_shape(report)
    assert report["ok"] is False
    assert by_url(report, ok.url)["ok"] is True
    [f] = errors(by_url(report, slow.url))
    assert (f["check"], f["error"]) == ("latency", "http_response_timeout")


async def test_a_stuck_upstream_is_an_error_even_with_a_long_response_header(upstream, monkeypatch):
    """Regression: an upstream that accepts and never answers passed the doctor (exit 0,
    only a latency warning) whenever timeouts.response_header was longer than the
    doctor's own wait."""
    import diagnostics.doctor as doctor

    monkeypatch.setattr(doctor, "HTTP_WAIT_CAP", 0.3)  # the doctor's own limit, shortened for the test
    hung = await upstream("hang")
    cfg = parse_config({"timeouts": {"response_header": 30},
                        "pools": {"app": {"retries": 0, "health": {"timeout": 0.2},
                                          "servers": [{"url": hung.url}]}}})
    report = await run_doctor(cfg)
    assert report["ok"] is False
    (server,) = report["servers"]
    errors = [f for f in server["findings"] if f["severity"] == "error"]
    assert any(f["error"] == "http_response_timeout" and "health checks give up" in f["observed"]
               for f in errors), server["findings"]


async def test_alert_112_is_named_the_same_as_the_proxy_names_it(upstream, pki):
    """Regression: the doctor's own copy of the alert parsing missed OpenSSL's
    TLSV1_<NAME> form, so unrecognized_name was tls_protocol_error in the doctor and
    tls_alert_received in the proxy. Both now read diagnostics/tls_alerts.py."""
    import ssl

    ctx = server_context(pki.good)
    ctx.sni_callback = lambda _obj, _name, _ctx: ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
    up = await upstream("ok", ssl=ctx)
    cfg = parse_config({"pools": {"app": {"retries": 0, "servers": [
        {"url": f"https://localhost:{up.port}", "ca_file": str(pki.ca)}]}}})
    report = await run_doctor(cfg)
    (server,) = report["servers"]
    assert any(f["error"] == "tls_alert_received" and "SNI" in (f["likely_cause"] or "")
               for f in server["findings"]), server["findings"]
