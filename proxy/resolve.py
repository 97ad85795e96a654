"""Upstream names -> addresses: asynchronous, cached, refreshed in the background.

- IP literals never touch the resolver.
- A name is resolved on first use (bounded by timeouts.connect) and cached for
  REFRESH seconds. After that the cached addresses keep serving while one background
  lookup refreshes them (a resolver hiccup never fails live traffic that worked); a
  failed refresh keeps the old answer and is logged.
- A name with several addresses gives one server several endpoints; connections
  rotate over them, and /debug/upstreams lists them.
- The lookup is injectable (`lookup(host, port) -> list[str]`), so tests never send DNS
  queries off this machine.

Failures are typed here, once: our own timeout is dns_timeout; getaddrinfo's answer
"no such name" is dns_error with rcode NXDOMAIN (RFC 9209 §2.3.2); EAI_AGAIN (SERVFAIL
or no reply from the resolver: getaddrinfo cannot tell) is dns_error with no rcode.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable

from proxy.errors import DnsError, DnsTimeout, ProxyError
from proxy.logs import log_event

REFRESH = 30.0
NEGATIVE = 2.0  # a failed first lookup is remembered this long: no lookup storm on a bad name
Lookup = Callable[[str, int], Awaitable[list[str]]]

# getaddrinfo's answer -> the DNS rcode it proves. EAI_AGAIN has none: glibc returns it
# for SERVFAIL and for no reply at all, so no rcode is claimed (RFC 9209 §2.3.2).
_RCODES = {socket.EAI_NONAME: "NXDOMAIN"}
if hasattr(socket, "EAI_NODATA"):
    _RCODES[socket.EAI_NODATA] = "NOERROR"  # the name exists, with no address of this family


def _settle(task: asyncio.Task) -> None:
    """Mark a shared lookup's failure as seen: every waiter may have gone away."""
    if not task.cancelled():
        task.exception()


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class Resolver:
    def __init__(self, loop: asyncio.AbstractEventLoop, lookup: Lookup | None = None) -> None:
        self._loop = loop
        self._lookup = lookup or self._getaddrinfo
        self._cache: dict[tuple[str, int], tuple[list[str], float]] = {}
        self._failed: dict[tuple[str, int], tuple[ProxyError, float]] = {}
        self._pending: dict[tuple[str, int], asyncio.Future] = {}  # cold lookups in flight, shared
        self._refreshing: set[tuple[str, int]] = set()
        self._tasks: set[asyncio.Task] = set()

    @property
    def lookup(self) -> Lookup:
        """The lookup in use (the injected one in tests), for the doctor to share."""
        return self._lookup

    async def _getaddrinfo(self, host: str, port: int) -> list[str]:
        infos = await self._loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return list(dict.fromkeys(info[4][0] for info in infos))  # unique, in resolver order

    async def addresses(self, host: str, port: int, timeout: float, *, upstream: str) -> list[str]:
        if is_ip(host):
            return [host]
        key = (host, port)
        entry = self._cache.get(key)
        now = self._loop.time()
        if entry is not None:
            if entry[1] <= now and key not in self._refreshing:
                self._refreshing.add(key)
                task = self._loop.create_task(self._refresh(key, timeout, upstream))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            return entry[0]
        failed = self._failed.get(key)
        if failed is not None and failed[1] > now:
            raise failed[0]
        # One lookup per name at a time, in its own task: every request waiting for the
        # name shares it, and a client that goes away cancels only its own wait.
        task = self._pending.get(key)
        if task is None:
            task = self._pending[key] = self._loop.create_task(self._first(key, timeout, upstream))
            self._tasks.add(task)
            task.add_done_callback(_settle)
            task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(task)

    async def _first(self, key: tuple[str, int], timeout: float, upstream: str) -> list[str]:
        try:
            addrs = await self._resolve(key[0], key[1], timeout, upstream)
        except (DnsError, DnsTimeout) as exc:
            self._failed[key] = (exc, self._loop.time() + NEGATIVE)
            raise
        else:
            self._cache[key] = (addrs, self._loop.time() + REFRESH)
            self._failed.pop(key, None)
            return addrs
        finally:
            self._pending.pop(key, None)

    async def _refresh(self, key: tuple[str, int], timeout: float, upstream: str) -> None:
        addrs = self._cache[key][0]
        try:
            addrs = await self._resolve(key[0], key[1], timeout, upstream)
        except (DnsError, DnsTimeout) as exc:
            log_event("dns_refresh_failed", name=key[0], error=exc.cause.value, details=exc.detail,
                      keeping=addrs)
        finally:
            self._cache[key] = (addrs, self._loop.time() + REFRESH)  # one refresh per period, always
            self._refreshing.discard(key)

    async def _resolve(self, host: str, port: int, timeout: float, upstream: str) -> list[str]:
        try:
            async with asyncio.timeout(timeout):
                addrs = await self._lookup(host, port)
        except TimeoutError:
            raise DnsTimeout(f"resolving {host} took longer than {timeout:g} s (timeouts.connect)",
                             upstream=upstream) from None
        except socket.gaierror as exc:
            raise DnsError(f"cannot resolve {host}: {exc.strerror}", upstream=upstream,
                           rcode=_RCODES.get(exc.errno)) from None
        except (UnicodeError, OSError, ValueError) as exc:  # e.g. a label over 63 bytes (IDNA)
            raise DnsError(f"cannot resolve {host}: {exc}", upstream=upstream) from None
        if not addrs:
            raise DnsError(f"{host} resolved to no address", upstream=upstream, rcode="NOERROR")
        return list(addrs)  # (an injected lookup may give any sequence; the compiled dial checks for a list)

    def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()
