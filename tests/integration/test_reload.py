"""SIGHUP reloads the config without dropping a connection (SPEC: Signals)."""

from __future__ import annotations

import signal

from tests.conftest import Client, http
from tests.procs import ProxyProc, spawned, write_config  # noqa: F401,F811 (spawned: fixture)


async def _header(port: int, name: str) -> str | None:
    return (await http(port)).header(name)


async def test_sighup_switches_new_requests_to_the_new_config(spawned, upstream, tmp_path):
    first, second = await upstream("ok", name="first"), await upstream("ok", name="second")
    cfg = write_config(tmp_path / "gw.toml", [first.url])
    gw = spawned(await ProxyProc.start("run", "-c", str(cfg)))
    port = await gw.wait_listening()
    assert await _header(port, "x-upstream") == "first"
    keep = await Client.open(port)  # an established keep-alive connection across the reload
    try:
        assert (await keep.request()).header("x-upstream") == "first"
        write_config(cfg, [second.url])
        await gw.wait_handles(signal.SIGHUP)
        gw.send_signal(signal.SIGHUP)
        await gw.wait_event("reloaded")
        assert await _header(port, "x-upstream") == "second"
        # the old connection was drained: the client reconnects and meets the new config
        data = await keep.read_all(timeout=5)
        assert data == b""
    finally:
        keep.close()
    assert gw.returncode is None  # still serving


async def test_a_bad_config_on_sighup_is_rejected_and_the_old_keeps_serving(spawned, upstream, tmp_path):
    up = await upstream("ok", name="kept")
    cfg = write_config(tmp_path / "gw.toml", [up.url])
    gw = spawned(await ProxyProc.start("run", "-c", str(cfg)))
    await gw.wait_listening()
    cfg.write_text(cfg.read_text() + "\n[pools.app.health]\nrise = 0\n")
    await gw.wait_handles(signal.SIGHUP)
    gw.send_signal(signal.SIGHUP)
    event = await gw.wait_event("reload_rejected")
    assert any(p.startswith("pools.app.health.rise") for p in event["problems"]), event
    assert await _header(gw.port, "x-upstream") == "kept"

