"""Run inside a fresh network namespace (`unshare -rn`): only loopback exists, so a
connect to any other address fails locally with ENETUNREACH and no packet can leave
the machine. Starts the proxy with one unroutable server, sends one request over
loopback, prints {"status", "proxy_status"} as JSON. Used by test_causes_e2e."""

from __future__ import annotations

import asyncio
import json
import sys

import uvloop

from proxy.config import parse_config
from proxy.server import Server


async def main(parser: str) -> None:
    cfg = parse_config({"listen": {"address": "127.0.0.1:0", "parser": parser},
                        "admin": {"address": "127.0.0.1:0"},
                        "pools": {"app": {"retries": 0, "servers": [{"url": "http://192.0.2.1:80"}]}}})
    server = await Server(cfg).start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        async with asyncio.timeout(10):
            data = await reader.read()
        writer.close()
    finally:
        await server.stop(grace=0)
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    proxy_status = [line.split(":", 1)[1].strip() for line in head[1:] if line.lower().startswith("proxy-status:")]
    print(json.dumps({"status": int(head[0].split()[1]), "proxy_status": proxy_status}))


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1]))
