"""`gatewise run`: serve until a signal says stop, with either runner.

One process (`server.Server`) or a supervisor with workers (`supervisor.Supervisor`):
both have start(), stop(), reload(cfg), `proxy` (None until started), `cfg`, and the
fields of their `listening` line and of `draining` and `reloaded` (status_fields: the
client connections of one process, or the number of workers).

Signals: SIGTERM/SIGINT drain gracefully (timeouts.shutdown_grace), SIGHUP reloads with
`reload_config()`, which raises ConfigError for a bad file: the running config keeps
serving and the problems are logged. The handlers are installed before the port
accepts connections, so a signal that arrives at once is already handled.
"""

from __future__ import annotations

import asyncio
import signal

from proxy import compiled
from proxy.config import ConfigError, ProxyConfig
from proxy.logs import log_event
from proxy.memory import keep_read_buffers


def run_forever(cfg: ProxyConfig, reload_config=None) -> int:
    keep_read_buffers()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; asyncio still works
        uvloop = None
    main = _serve(cfg, reload_config)
    return uvloop.run(main) if uvloop is not None else asyncio.run(main)


async def _serve(cfg: ProxyConfig, reload_config) -> int:
    if cfg.listen.workers > 1:
        from proxy.supervisor import Supervisor

        runner = Supervisor(cfg)
    else:
        from proxy.server import Server

        runner = Server(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloading: list[asyncio.Task] = []

    async def reload() -> None:
        if reload_config is None:
            log_event("reload_skipped", reason="no config file (gatewise run --to)")
            return
        try:
            new_cfg = reload_config()
        except ConfigError as exc:
            log_event("reload_rejected", problems=exc.problems, serving=runner.cfg.source)
            return
        notes = await runner.reload(new_cfg)
        log_event("reloaded", config=new_cfg.source, notes=notes or None, **runner.status_fields(),
                  pools={n: [s.url for s in p.servers] for n, p in runner.proxy.pools.items()})

    def on_sighup() -> None:
        if runner.proxy is None:  # still starting: nothing to swap yet
            log_event("reload_skipped", reason="still starting")
        elif not (reloading and not reloading[-1].done()):  # one reload at a time
            reloading.append(loop.create_task(reload()))

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    try:
        await runner.start()
    except OSError as exc:
        log_event("listen_failed", address=cfg.listen.address, error=str(exc))
        return 1
    log_event("listening", **runner.listening_fields(), hot_path=compiled.describe(),
              pools={n: [s.url for s in p.servers] for n, p in runner.proxy.pools.items()}, config=cfg.source)
    await stop.wait()
    log_event("draining", grace_s=runner.cfg.timeouts.shutdown_grace, **runner.status_fields())
    for task in reloading:
        task.cancel()
    await runner.stop()
    log_event("stopped")
    return 0
