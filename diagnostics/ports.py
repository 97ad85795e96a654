"""Listening TCP ports of this machine, from /proc/net/tcp and /proc/net/tcp6 (Linux).

Used by `gatewise doctor` when a local port refuses: "nothing listens on 5000; something
listens on 3000" is the classic wrong-port mistake, and /proc names the candidates without
any extra tool (`ss` may not be installed) or privilege.

Format (proc(5), net/ipv4/tcp_ipv4.c): one socket per line after a header,
`sl local_address rem_address st ...`; addresses are `HEX:PORT` where the address is the
raw in-kernel value printed as 32-bit words in host byte order (so 127.0.0.1 reads
`0100007F` on little-endian machines) and the port is big-endian hex. `st` 0A is LISTEN.

- The parser is pure (text in, listeners out) and never raises on odd lines: it skips them.
- Only sockets in this process's network namespace are visible (a container sees its own).
- Never imports `proxy`: diagnostics never does.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

TCP_LISTEN = 0x0A
PROC_PATHS = ("/proc/net/tcp", "/proc/net/tcp6")


@dataclass(frozen=True, slots=True, order=True)
class Listener:
    port: int
    address: str          # "127.0.0.1", "::", "::1", "0.0.0.0"; IPv4-mapped stays IPv6 text
    family: int           # 4 or 6

    @property
    def wildcard(self) -> bool:
        return self.address in ("0.0.0.0", "::")


def _address(hex_addr: str) -> tuple[str, int] | None:
    """Kernel hex address -> (text, family); None when malformed."""
    if len(hex_addr) not in (8, 32):
        return None
    try:
        words = [int(hex_addr[i:i + 8], 16) for i in range(0, len(hex_addr), 8)]
    except ValueError:
        return None
    raw = b"".join(struct.pack("=I", w) for w in words)   # host byte order, as the kernel printed it
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(raw)), 4
    v6 = ipaddress.IPv6Address(raw)
    if v6.ipv4_mapped is not None:   # one spelling on every Python: "::ffff:127.0.0.1"
        return f"::ffff:{v6.ipv4_mapped}", 6
    return str(v6), 6


def parse_proc_net_tcp(text: str) -> list[Listener]:
    """Listening sockets (state 0A) in the text of /proc/net/tcp or /proc/net/tcp6."""
    out: list[Listener] = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 4 or not parts[0].endswith(":") or not parts[0][:-1].isdigit():
            continue   # the header, or noise
        local, state = parts[1], parts[3]
        try:
            if int(state, 16) != TCP_LISTEN:
                continue
        except ValueError:
            continue
        hex_addr, sep, hex_port = local.rpartition(":")
        parsed = _address(hex_addr) if sep else None
        if parsed is None:
            continue
        try:
            port = int(hex_port, 16)
        except ValueError:
            continue
        if 0 < port <= 65535:
            out.append(Listener(port, parsed[0], parsed[1]))
    return out


def listening_ports(paths: tuple[str, ...] = PROC_PATHS) -> list[Listener]:
    """Every listening TCP socket visible in `paths` (missing files are skipped: no IPv6,
    or not Linux), deduplicated and sorted by port."""
    found: set[Listener] = set()
    for path in paths:
        try:
            with open(path, encoding="ascii", errors="replace") as f:
                found.update(parse_proc_net_tcp(f.read()))
        except OSError:
            continue
    return sorted(found)


def reachable_on(ip: str, listeners: list[Listener]) -> list[int]:
    """Ports a client connecting to `ip` could reach: sockets bound to that very address,
    or to a wildcard of its family; an IPv4 target also reaches `::` (dual-stack unless
    IPV6_V6ONLY, which /proc does not show) and its IPv4-mapped IPv6 form."""
    target = ipaddress.ip_address(ip)
    names = {str(target)}
    if target.version == 4:
        names |= {"0.0.0.0", "::", f"::ffff:{target}"}
    else:
        names.add("::")
        if target.ipv4_mapped is not None:
            names |= {str(target.ipv4_mapped), "0.0.0.0"}
    return sorted({lst.port for lst in listeners if lst.address in names})
