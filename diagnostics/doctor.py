"""`gatewise doctor` and `/debug/doctor`: the 502 troubleshooting routine, run for every server.

Per server, in order, stopping where later checks cannot tell anything more:
    resolve   names only (IP literals skip it): getaddrinfo bounded by timeouts.connect
    connect   TCP to every resolved address at once, bounded by timeouts.connect; a refused
              local port lists what *is* listening there (diagnostics.ports) and suggests it
    tls       https: handshake as the proxy does it (tls_verify, ca_file, sni); a failed
              handshake is retried as plain HTTP to catch "speaks plain HTTP: use http://"
    http      GET of the pool's health path ("/" without a health table): status, latency;
              on an http:// server, TLS bytes back (or silence and then a working handshake)
              mean "speaks TLS: use https://"
    latency   time to the response head against timeouts.response_header (error above it,
              warning above half) and against health.timeout (checks would fail)
plus config smells from the config alone and from observed latency (report["config"]).

Report (SPEC "Doctor"; the JSON shape is the contract):
    {"ok": bool, "servers": [{"pool", "url", "ok", "findings": [finding...]}],
     "config": [{"severity", "key", "message"}]}
    finding = {"severity": error|warning|info, "check": resolve|connect|tls|http|latency,
               "error": RFC 9209 token or None, "observed", "likely_cause", "next_step",
               "suggestion"?}
Passed checks are `info` findings (likely_cause/next_step null) so a person sees what was
verified. A server is ok when it has no error finding; the report is ok when no server
and no config entry has one. `main_doctor` exits 0 when ok, else 1.

Rules:
- Never imports `proxy` (diagnostics never does): the loaded config object is handed in
  and only its attributes are read (cfg.pools[name].servers[i].url/scheme/host/port/...).
- Probes of all servers run concurrently; each phase has its own timeout and the whole
  run is bounded (`run_bound`); a probe cut short says which check it was in.
- `resolver(host, port)` is injectable (async, returns addresses as strings, or
  getaddrinfo tuples), so tests never send DNS queries off this machine.
- `now()` is the clock every elapsed time is measured with (default time.perf_counter:
  uvloop's loop clock ticks in whole milliseconds, too coarse for loopback latencies).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import re
import socket
import ssl
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from diagnostics.tls_alerts import CLIENT_REFUSED, alert_name
from diagnostics import ports as _ports

SEVERITIES = ("error", "warning", "info")
CHECKS = ("resolve", "connect", "tls", "http", "latency", "config")

HTTP_WAIT_CAP = 10.0        # longest the doctor waits for a response head
HEAD_LIMIT = 64 * 1024      # a response head larger than this is a finding on its own
CANDIDATE_PROBES = 8        # listening ports probed for HTTP when a local port refuses
CANDIDATE_TIMEOUT = 0.5
CERT_EXPIRY_WARN_DAYS = 14
USER_AGENT = "gatewise-doctor"

Resolver = Callable[[str, int], Awaitable[list]]

_UNROUTABLE = {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN}

# OpenSSL X509_V_ERR_* codes (openssl/x509_vfy.h) -> (what was wrong, likely cause, next step).
_CERT = {
    9: ("not yet valid", "the certificate's validity starts in the future, or this machine's clock is wrong",
        "check the clock here and on the server (`date -u`); reissue the certificate if its dates are wrong"),
    10: ("expired", "the certificate has expired (or this machine's clock is wrong)",
         "renew the certificate on the server; check the clock with `date -u`"),
    18: ("self-signed", "the server presents a self-signed certificate that nothing here trusts",
         "set ca_file = that certificate for this server (or use a certificate from a trusted CA); "
         "tls_verify = false only for tests"),
    19: ("self-signed", "the chain ends in a self-signed root that is not trusted here",
         "set ca_file = the root CA certificate (PEM) for this server"),
    20: ("unknown CA", "the certificate is signed by a CA this machine does not trust (a private CA?)",
         "set ca_file = the issuing CA's certificate (PEM) for this server"),
    21: ("unknown CA", "the certificate's issuer is unknown here, or the server does not send its "
                       "intermediate certificates", "set ca_file = the issuing CA's certificate, or make the "
                                                    "server send its full chain"),
    2: ("unknown CA", "the issuer certificate is not available here",
        "set ca_file = the issuing CA's certificate (PEM) for this server"),
    62: ("name mismatch", None, None),
    64: ("name mismatch", None, None),
}


# ---- findings ------------------------------------------------------------------------------

def finding(severity: str, check: str, error: str | None, observed: str, likely_cause: str | None = None,
            next_step: str | None = None, suggestion: str | None = None) -> dict:
    assert severity in SEVERITIES and check in CHECKS, (severity, check)
    out = {"severity": severity, "check": check, "error": error, "observed": observed,
           "likely_cause": likely_cause, "next_step": next_step}
    if suggestion is not None:
        out["suggestion"] = suggestion
    return out


def _ms(seconds: float) -> str:
    ms = seconds * 1000
    if ms < 1:
        return f"{ms:.2f} ms"
    if ms < 1000:
        return f"{ms:.1f} ms"
    return f"{seconds:.2f} s"


def _s(seconds: float) -> str:
    return f"{seconds:g} s"


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_local_address(ip: str) -> bool:
    """Loopback, unspecified (connects to this host), or an address of one of this machine's
    interfaces (bind() to it succeeds only then)."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if addr.is_loopback or addr.is_unspecified:
        return True
    family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((ip, 0))
        return True
    except OSError:
        return False


def _looks_like_tls(data: bytes) -> bool:
    """A TLS record header (RFC 8446 §5.1): content type 20-23, then version 3.x."""
    return len(data) >= 2 and 20 <= data[0] <= 23 and data[1] == 3


_STATUS = re.compile(rb"HTTP/1\.[01] (\d{3})(?: ([^\r\n]*))?\r?\n")


def _server_attr(server: Any, name: str, default: Any = None) -> Any:
    return getattr(server, name, default)


# ---- one server ----------------------------------------------------------------------------

class _Probe:
    """The routine for one server; findings accumulate as it goes, so a probe cut short by
    the run's bound still reports what it saw, plus which check it was in."""

    def __init__(self, cfg: Any, pool_name: str, pool: Any, server: Any, resolver: Resolver | None,
                 clock: Callable[[], float]) -> None:
        self.cfg, self.pool_name, self.pool, self.server = cfg, pool_name, pool, server
        self.resolver, self.clock = resolver, clock
        self.loop = asyncio.get_running_loop()
        t = cfg.timeouts
        self.t_connect = float(t.connect)
        self.t_header = float(t.response_header)
        self.health = getattr(pool, "health", None)
        self.path = self.health.path if self.health is not None else "/"
        waits = [self.t_header * 2, 1.0] + ([float(self.health.timeout) * 2] if self.health else [])
        self.http_wait = min(max(waits), HTTP_WAIT_CAP)
        self.scheme = server.scheme
        self.host, self.port = server.host, int(server.port)
        self.address = _hostport(self.host, self.port)
        self.findings: list[dict] = []
        self.check = "resolve"
        self.latency: float | None = None
        self._socks: list[socket.socket] = []             # ours to close (not yet in a transport)
        self._writers: list[asyncio.StreamWriter] = []    # transports to close

    def add(self, *args: Any, **kwargs: Any) -> None:
        self.findings.append(finding(*args, **kwargs))

    def bound(self) -> float:
        """Worst case of this probe: every phase at its own timeout, plus the port scan."""
        return (self.t_connect * (5 if self.scheme == "https" else 4) + self.http_wait
                + CANDIDATE_TIMEOUT * 2 + 1.0)

    def report(self) -> dict:
        return {"pool": self.pool_name, "url": self.server.url,
                "ok": not any(f["severity"] == "error" for f in self.findings),
                "findings": self.findings}

    async def aclose(self) -> None:
        writers, self._writers = self._writers, []
        await asyncio.gather(*(_close(w) for w in writers))
        socks, self._socks = self._socks, []
        for sock in socks:
            sock.close()

    async def run(self) -> None:
        try:
            ips = await self.resolve()
            if not ips:
                return
            self.check = "connect"
            connected = await self.connect(ips)
            if connected is None:
                return
            sock, ip = connected
            self._socks.remove(sock)   # the transport owns (and closes) it from here on
            if self.scheme == "https":
                self.check = "tls"
                streams = await self.tls(sock, ip)
            else:
                streams = await asyncio.open_connection(sock=sock)
                self._writers.append(streams[1])
            if streams is None:
                return
            self.check = "http"
            await self.http(*streams, ip)
        finally:
            await self.aclose()

    # -- resolve
    async def _lookup(self) -> list[str]:
        if self.resolver is not None:
            answer = await self.resolver(self.host, self.port)
        else:
            answer = await self.loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        ips = [a if isinstance(a, str) else a[4][0] for a in answer]
        return list(dict.fromkeys(ips))

    async def resolve(self) -> list[str]:
        if _is_ip(self.host):
            return [self.host]
        started = self.clock()
        host = self.host
        try:
            async with asyncio.timeout(self.t_connect):
                ips = await self._lookup()
        except TimeoutError:
            self.add("error", "resolve", "dns_timeout",
                     f"no answer for {host} within {_ms(self.clock() - started)} "
                     f"(timeouts.connect = {_s(self.t_connect)})",
                     "the DNS server is slow or unreachable from this machine",
                     f"check /etc/resolv.conf and try `getent hosts {host}`; put the name in /etc/hosts "
                     "or use an IP address if DNS cannot be fixed")
            return []
        except socket.gaierror as exc:
            code = {socket.EAI_NONAME: "NXDOMAIN"}.get(exc.errno)  # EAI_AGAIN proves no rcode
            what = exc.strerror or str(exc)
            if exc.errno == socket.EAI_AGAIN:
                cause = "a temporary DNS failure: the DNS server did not give a usable answer"
            else:
                cause = f"the name {host} does not exist (a typo?), or it is in neither DNS nor /etc/hosts"
            self.add("error", "resolve", "dns_error",
                     f"cannot resolve {host}: {what}" + (f" ({code})" if code else "")
                     + f" after {_ms(self.clock() - started)}",
                     cause, f"check the host in the URL; `getent hosts {host}` shows what this machine resolves")
            return []
        except (UnicodeError, OSError, ValueError) as exc:  # e.g. IDNA: a label over 63 bytes
            self.add("error", "resolve", "dns_error", f"cannot resolve {host}: {exc}",
                     f"the name {host} is not a valid DNS name", "fix the host in the URL")
            return []
        except OSError as exc:
            self.add("error", "resolve", "dns_error", f"cannot resolve {host}: {exc}",
                     "the resolver failed", f"try `getent hosts {host}`")
            return []
        if not ips:
            self.add("error", "resolve", "dns_error", f"{host} resolved to no address",
                     "the name exists but has no address record", f"try `getent hosts {host}`")
            return []
        self.add("info", "resolve", None, f"{host} -> {', '.join(ips)} in {_ms(self.clock() - started)}")
        return ips

    # -- connect
    async def _connect_one(self, ip: str) -> tuple[socket.socket | None, str, float, BaseException | None]:
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        self._socks.append(sock)
        started = self.clock()
        try:
            async with asyncio.timeout(self.t_connect):
                await self.loop.sock_connect(sock, (ip, self.port))
        except (TimeoutError, OSError) as exc:
            self._socks.remove(sock)
            sock.close()
            return None, ip, self.clock() - started, exc
        return sock, ip, self.clock() - started, None

    def _connect_failure(self, ip: str, elapsed: float, exc: BaseException) -> tuple[str, str, str, str]:
        """(token, observed, likely cause, next step) for one failed connect."""
        target = _hostport(ip, self.port)
        if isinstance(exc, TimeoutError) or getattr(exc, "errno", None) == errno.ETIMEDOUT:
            return ("connection_timeout",
                    f"connect to {target} timed out after {_ms(elapsed)} (timeouts.connect = {_s(self.t_connect)})",
                    "packets are dropped: a firewall, a host that is down, or a service whose accept queue "
                    "is full (overloaded)",
                    f"check the host is up and port {self.port} is open in its firewall; on the host, "
                    "`ss -tln` shows the listen queue (Recv-Q)")
        code = getattr(exc, "errno", None)
        name = errno.errorcode.get(code or 0, "error")
        if isinstance(exc, ConnectionRefusedError) or code in (errno.ECONNREFUSED, errno.ECONNRESET):
            return ("connection_refused", f"connect {name} in {_ms(elapsed)}",
                    f"nothing listens on {target}",
                    "start the service, or point the config at the port it uses")
        if code in _UNROUTABLE:
            return ("destination_ip_unroutable", f"connect {name} in {_ms(elapsed)}",
                    f"no route to {ip}: a wrong address, a host that is down, or a network misconfiguration",
                    f"check the address; `ip route get {ip}` and `ping {ip}` from this machine")
        return ("proxy_internal_error", f"connect {name} ({getattr(exc, 'strerror', None) or exc}) "
                                        f"in {_ms(elapsed)}",
                "this machine could not open the connection (a local resource limit or address problem)",
                "check `ulimit -n` and the local network configuration")

    async def connect(self, ips: list[str]) -> tuple[socket.socket, str] | None:
        results = await asyncio.gather(*(self._connect_one(ip) for ip in ips[:4]))
        good = [r for r in results if r[0] is not None]
        bad = [r for r in results if r[0] is None]
        for sock, _, _, _ in good[1:]:
            self._socks.remove(sock)
            sock.close()
        if good:
            sock, ip, elapsed, _ = good[0]
            self.add("info", "connect", None, f"connected to {_hostport(ip, self.port)} in {_ms(elapsed)}")
            for _, bad_ip, bad_elapsed, exc in bad:
                token, observed, cause, step = self._connect_failure(bad_ip, bad_elapsed, exc)
                self.add("warning", "connect", token, f"{observed} on {_hostport(bad_ip, self.port)}, "
                                                      f"while {ip} works",
                         f"{cause}; the proxy moves on to the next address when one refuses, but each "
                         "new connection that meets a timeout here fails",
                         f"make the service listen on {bad_ip} too, or put {ip} in the URL")
            return sock, ip
        _, ip, elapsed, exc = bad[0]
        token, observed, cause, step = self._connect_failure(ip, elapsed, exc)
        suggestion = None
        if len(bad) > 1:
            observed += " (also on " + ", ".join(_hostport(r[1], self.port) for r in bad[1:]) + ")"
        if token == "connection_refused":
            observed, cause, step, suggestion = await self._wrong_port([r[1] for r in bad], observed,
                                                                       cause, step)
        self.add("error", "connect", token, observed, cause, step, suggestion)
        return None

    async def _wrong_port(self, ips: list[str], observed: str, cause: str, step: str):
        """A refused local port: what listens instead, and which port was probably meant."""
        local = [ip for ip in ips if is_local_address(ip)]
        if not local:
            return observed, cause + " (or a firewall rejects the connection)", step, None
        listeners = await asyncio.to_thread(_ports.listening_ports)
        # never suggest gatewise itself: a proxy pointed at its own port loops
        own = {getattr(getattr(self.cfg, section, None), "port", 0) for section in ("listen", "admin")}
        candidates = sorted({p for ip in local for p in _ports.reachable_on(ip, listeners)}
                            - {self.port} - own)
        where = _hostport(local[0], self.port)
        if not candidates:
            return (f"{observed}: nothing listens on {where}, and no other TCP port listens on "
                    f"{local[0]} either", "the service is not running",
                    "start the service (its logs say why it is not up); `ss -tlnp` lists what listens", None)
        nearest = sorted(candidates, key=lambda p: (abs(p - self.port), p))
        answers = await asyncio.gather(*(self._speaks(local[0], p) for p in nearest[:CANDIDATE_PROBES]))
        speaking = [(p, scheme) for p, scheme in zip(nearest, answers) if scheme]
        best, scheme = speaking[0] if speaking else (nearest[0], self.scheme)
        shown = sorted(nearest[:8])
        more = f" (and {len(nearest) - len(shown)} more)" if len(nearest) > len(shown) else ""
        listening = ", ".join(map(str, shown)) + more
        observed = f"{observed}: nothing listens on {where}; something listens on {listening}"
        how = (f" and answers {'HTTP' if scheme == 'http' else 'TLS'}" if speaking
               else f"; it did not answer {'TLS' if self.scheme == 'https' else 'HTTP'} within "
                    f"{_s(CANDIDATE_TIMEOUT)}, so it may be something else")
        cause = (f"nothing listens on {where}: the service is down, or it runs on another port "
                 f"({best} is the nearest that listens{how})")
        step = (f"start the service on port {self.port}, or point the config at the port it uses "
                f"(`ss -tlnp` shows which process owns {best})")
        return observed, cause, step, f"{scheme}://{_hostport(self.host, best)}"

    async def _speaks(self, ip: str, port: int) -> str | None:
        """"http" if ip:port answers a plain GET with HTTP, "https" if it speaks TLS, else None."""
        try:
            async with asyncio.timeout(CANDIDATE_TIMEOUT):
                if self.scheme == "https":
                    return "https" if await self._tls_handshake_works(ip, port) else None
                reader, writer = await asyncio.open_connection(ip, port)
                try:
                    writer.write(self._request())
                    data = await reader.read(16)
                finally:
                    await _close(writer)
        except (OSError, TimeoutError, ssl.SSLError, EOFError):
            return None
        if data.startswith(b"HTTP/"):
            return "http"
        return "https" if _looks_like_tls(data) else None

    # -- tls
    def _context(self) -> ssl.SSLContext:
        server = self.server
        if _server_attr(server, "tls_verify", True):
            ctx = ssl.create_default_context(cafile=_server_attr(server, "ca_file"))
        else:
            ctx = _unverified_context()
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx

    def _server_name(self) -> str:
        return _server_attr(self.server, "sni") or self.host

    async def tls(self, sock: socket.socket, ip: str):
        name = self._server_name()
        try:
            ctx = self._context()
        except (OSError, ssl.SSLError) as exc:
            self.add("error", "tls", "tls_certificate_error",
                     f"cannot load ca_file {_server_attr(self.server, 'ca_file')}: {exc}",
                     "the ca_file is not a PEM certificate (or not readable)",
                     "point ca_file at the CA certificate in PEM form")
            return None
        started = self.clock()
        try:
            async with asyncio.timeout(self.t_connect):
                reader, writer = await asyncio.open_connection(sock=sock, ssl=ctx, server_hostname=name)
        except ssl.SSLCertVerificationError as exc:
            code = exc.verify_code
            kind, cause, step = _CERT.get(code, (None, None, None))
            message = (exc.verify_message or exc.reason or str(exc)).rstrip(".")
            if code in (62, 64):
                cause = f"the certificate is not valid for {name} (the name this server is reached by)"
                step = ("use a URL host the certificate was issued for, set sni = that name, or reissue "
                        f"the certificate with {name} in its subjectAltName")
            self.add("error", "tls", "tls_certificate_error",
                     f"certificate rejected: {kind or 'verification failed'} ({message}, verify code {code})",
                     cause or f"the certificate does not verify: {message}",
                     step or "fix the server's certificate, or set ca_file to the CA that issued it")
            return None
        except TimeoutError:  # TCP is up: a stalled handshake is a TLS problem (as in the proxy)
            self.add("error", "tls", "tls_protocol_error",
                     f"no TLS handshake within {_ms(self.clock() - started)} "
                     f"(timeouts.connect = {_s(self.t_connect)})",
                     "the port does not speak TLS (a plain HTTP server waiting for a request?) or is stuck",
                     f"check that {self.address} serves HTTPS; if it serves plain HTTP use http://")
            return None
        except (ssl.SSLError, OSError, EOFError) as exc:
            await self._tls_failure(exc, ip, self.clock() - started)
            return None
        self._writers.append(writer)
        self._tls_info(writer, name, self.clock() - started)
        return reader, writer

    async def _tls_failure(self, exc: BaseException, ip: str, elapsed: float) -> None:
        if await self._speaks_plain_http(ip):
            self.add("error", "tls", "tls_protocol_error",
                     f"TLS handshake failed after {_ms(elapsed)}: {self.address} speaks plain HTTP: use http://",
                     "the URL says https:// but the service on this port speaks plain HTTP",
                     "change the URL to http:// (or enable TLS on the service)",
                     f"http://{self.address}")
            return
        reason = getattr(exc, "reason", None) or ""
        if self._alert(exc, f"during the handshake after {_ms(elapsed)}"):
            return
        if isinstance(exc, (ssl.SSLEOFError, ConnectionResetError, EOFError)) or not reason:
            what = "the server closed the connection during the TLS handshake"
        else:
            what = f"TLS handshake failed: {reason.lower().replace('_', ' ')}"
        self.add("error", "tls", "tls_protocol_error", f"{what} after {_ms(elapsed)}",
                 "the port does not speak TLS as expected, or the server aborts handshakes",
                 f"check that {self.address} serves HTTPS; `openssl s_client -connect {self.address}` "
                 "shows what it answers")

    def _alert(self, exc: BaseException, when: str, check: str = "tls") -> bool:
        """A fatal TLS alert from the server (OpenSSL reason *_ALERT_*): tls_alert_received."""
        name = alert_name(getattr(exc, "reason", None))
        if name is not None:
            alert = name.lower()
            if name in CLIENT_REFUSED:
                cause = "the server wants a client certificate (mutual TLS) that gatewise does not send"
                step = "turn off client certificate checks for the proxy on the server, or terminate mTLS elsewhere"
            elif name == "UNRECOGNIZED_NAME":
                cause = f"the server has no certificate for the name {self._server_name()!r} (SNI)"
                step = "set sni = a name the server serves, or use it as the URL host"
            else:
                cause = ("the server rejected the handshake: no common protocol version or cipher, or a "
                         "server-side TLS policy")
                step = "compare the server's TLS settings with ours (TLS 1.2 or newer)"
            self.add("error", check, "tls_alert_received",
                     f"the server sent TLS alert {alert!r} {when}", cause,
                     f"{step}; `openssl s_client -connect {self.address} -servername {self._server_name()}` "
                     "shows the server's side")
            return True
        return False

    async def _speaks_plain_http(self, ip: str) -> bool:
        try:
            async with asyncio.timeout(self.t_connect):
                reader, writer = await asyncio.open_connection(ip, self.port)
                try:
                    writer.write(self._request())
                    data = await reader.read(5)
                finally:
                    await _close(writer)
        except (OSError, TimeoutError, EOFError):
            return False
        return data.startswith(b"HTTP/")

    def _tls_info(self, writer: asyncio.StreamWriter, name: str, elapsed: float) -> None:
        ssl_object = writer.get_extra_info("ssl_object")
        version = ssl_object.version() if ssl_object else None
        cipher = (ssl_object.cipher() or ("?",))[0] if ssl_object else "?"
        cert = ssl_object.getpeercert() if ssl_object else None
        verified = _server_attr(self.server, "tls_verify", True)
        text = f"{version or 'TLS'} {cipher} in {_ms(elapsed)}"
        if verified:
            text += f", certificate verified for {name}"
        else:
            text += " (certificate NOT verified: tls_verify = false)"
        if cert and cert.get("notAfter"):
            days = (ssl.cert_time_to_seconds(cert["notAfter"]) - time.time()) / 86400
            text += f", expires in {days:.0f} days"
            if days < CERT_EXPIRY_WARN_DAYS:
                self.add("info", "tls", None, text)
                self.add("warning", "tls", None, f"the certificate expires in {days:.1f} days "
                                                 f"({cert['notAfter']})",
                         "the certificate is about to expire", "renew it on the server before it does")
                return
        self.add("info", "tls", None, text)

    # -- http
    def _request(self) -> bytes:
        host = self.address if self.port != {"http": 80, "https": 443}.get(self.scheme) else (
            f"[{self.host}]" if ":" in self.host else self.host)
        return (f"GET {self.path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {USER_AGENT}\r\n"
                "Accept: */*\r\nConnection: close\r\n\r\n").encode("latin-1")

    async def _read_head(self, reader: asyncio.StreamReader) -> tuple[bytes, bool]:
        """(bytes read, closed): stops at the end of the head, at EOF, or past HEAD_LIMIT."""
        data = bytearray()
        while b"\r\n\r\n" not in data and len(data) <= HEAD_LIMIT:
            if data and not data[:5] == b"HTTP/"[:len(data[:5])]:
                break   # not HTTP: no point in waiting for a head that will not come
            try:
                piece = await reader.read(65536)
            except (ConnectionResetError, BrokenPipeError):
                return bytes(data), True
            if not piece:
                return bytes(data), True
            data += piece
        return bytes(data), False

    async def http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ip: str) -> None:
        target = f"GET {self.path}"
        writer.write(self._request())
        started = self.clock()
        try:
            async with asyncio.timeout(self.http_wait):
                data, closed = await self._read_head(reader)
        except TimeoutError:
            waited = self.clock() - started
            if waited >= self.t_header:
                self.add("error", "http", "http_response_timeout",
                         f"{target}: no response head within {_ms(waited)} "
                         f"(timeouts.response_header = {_s(self.t_header)})",
                         "the upstream is stuck or far slower than the timeout: the proxy answers 504",
                         "look at the upstream (its logs, CPU, what it waits on); raise "
                         "timeouts.response_header only if that latency is expected")
            else:
                # No head within the doctor's own limit: stuck or far too slow for people,
                # even when response_header is longer still (and health checks fail first).
                health = self.health
                checks = (f"; health checks give up after {_s(float(health.timeout))}, so it is marked "
                          "unhealthy" if health is not None and waited >= float(health.timeout) else "")
                self.add("error", "http", "http_response_timeout",
                         f"{target}: no response head within {_ms(waited)} (the doctor stopped waiting; "
                         f"timeouts.response_header = {_s(self.t_header)}){checks}",
                         "the upstream is stuck or very slow", "look at the upstream (its logs, CPU, what it "
                                                               "waits on)")
            return
        except ssl.SSLError as exc:
            if not self._alert(exc, f"in answer to {target}"):
                self.add("error", "http", "tls_protocol_error", f"{target}: TLS error while reading: "
                                                                f"{exc.reason or exc}",
                         "the TLS session broke after the handshake", "check the server's TLS logs")
            return
        elapsed = self.clock() - started
        if not data:
            await self._silent(ip, target, elapsed)
            return
        if self.scheme == "http" and _looks_like_tls(data):
            self._speaks_tls(f"{target}: the answer is a TLS record ({data[:3].hex(' ')} ...) after "
                             f"{_ms(elapsed)}")
            return
        m = _STATUS.match(data)
        if not data.startswith(b"HTTP/") or (m is None and (b"\r\n" in data[:64] or b"\r\n\r\n" in data)):
            self.add("error", "http", "http_protocol_error",
                     f"{target}: the answer is not HTTP/1.1: first bytes {data[:24]!r}",
                     "this port runs another protocol (a database, SSH, gRPC/HTTP2-only, ...)",
                     "point the URL at the service's HTTP port")
            return
        if b"\r\n\r\n" not in data:
            if len(data) > HEAD_LIMIT:
                self.add("error", "http", "http_response_header_section_size",
                         f"{target}: response head larger than {HEAD_LIMIT // 1024} KiB",
                         "the upstream sends huge headers (cookies?)",
                         "shrink the headers, or raise limits.max_response_header_bytes")
            else:
                self.add("error", "http", "connection_terminated",
                         f"{target}: the connection closed in the middle of the response head after "
                         f"{_ms(elapsed)}", "the upstream crashed or was killed while answering",
                         "check the upstream's logs around now")
            return
        self.latency = elapsed
        status = int(m[1])
        reason = (m[2] or b"").decode("latin-1").strip()
        seen = f"{target} -> {status}{' ' + reason if reason else ''} in {_ms(elapsed)}"
        self._judge_status(status, seen)
        self._judge_latency(elapsed, target)

    async def _silent(self, ip: str, target: str, elapsed: float) -> None:
        """Closed without a byte: a TLS server often does that to plain HTTP."""
        if self.scheme == "http" and await self._tls_handshake_works(ip, self.port):
            self._speaks_tls(f"{target}: the connection closed without an answer after {_ms(elapsed)}, "
                             "and a TLS handshake on the same port succeeds")
            return
        self.add("error", "http", "connection_terminated",
                 f"{target}: the connection closed without an answer after {_ms(elapsed)}",
                 "the upstream crashed, rejects this request, or is not an HTTP server",
                 "check the upstream's logs around now")

    def _speaks_tls(self, observed: str) -> None:
        self.add("error", "http", "http_protocol_error", f"{observed}: {self.address} speaks TLS: use https://",
                 "the URL says http:// but the service on this port speaks TLS (HTTPS)",
                 "change the URL to https:// (with ca_file if its certificate is from a private CA)",
                 f"https://{self.address}")

    async def _tls_handshake_works(self, ip: str, port: int) -> bool:
        """A TLS handshake (nothing verified) to ip:port completes."""
        name = _server_attr(self.server, "sni") or (None if _is_ip(self.host) else self.host)
        try:
            async with asyncio.timeout(self.t_connect):
                _, writer = await asyncio.open_connection(ip, port, ssl=_unverified_context(),
                                                          server_hostname=name or ip)
                await _close(writer)
        except (OSError, TimeoutError, ssl.SSLError, EOFError):
            return False
        return True

    def _judge_status(self, status: int, seen: str) -> None:
        health = self.health
        if health is not None:
            lo, hi = health.expect_status
            if lo <= status <= hi:
                self.add("info", "http", None, seen)
                return
            expect = f"{lo}" if lo == hi else f"{lo}-{hi}"
            if status == 404:
                cause = f"the health path {self.path} does not exist on this server (a wrong health.path?)"
            elif status >= 500:
                cause = "the service reports an error: it is up but unhealthy (a dependency down?)"
            else:
                cause = f"the service answers {status} where health checks expect {expect}"
            self.add("error", "http", None, f"{seen}; pools.{self.pool_name}.health.expect_status = {expect}",
                     cause + ": health checks mark it unhealthy and it gets no traffic",
                     f"fix the service, or set pools.{self.pool_name}.health.path / expect_status to what "
                     "it serves")
            return
        if status >= 500:
            self.add("warning", "http", None, seen, "the service answers with a server error",
                     "check the upstream's logs; add a [pools.NAME.health] table with a path that "
                     "reflects its health")
        else:
            self.add("info", "http", None, seen)

    def _judge_latency(self, latency: float, target: str) -> None:
        header = self.t_header
        if latency > header:
            self.add("error", "latency", "http_response_timeout",
                     f"{target}: response head after {_ms(latency)}, more than timeouts.response_header = "
                     f"{_s(header)}",
                     "the upstream is slower than the timeout allows: the proxy answers 504 "
                     "http_response_timeout",
                     "make the upstream faster, or raise timeouts.response_header above its worst latency")
        elif latency > header / 2:
            self.add("warning", "latency", None,
                     f"{target}: response head after {_ms(latency)}, more than half of "
                     f"timeouts.response_header = {_s(header)}",
                     "the upstream is close to the timeout: a little more load and requests fail with 504",
                     "watch its latency; give timeouts.response_header more headroom")
        health = self.health
        if health is not None and latency > float(health.timeout):
            self.add("error", "latency", None,
                     f"{target}: response head after {_ms(latency)}, more than "
                     f"pools.{self.pool_name}.health.timeout = {_s(float(health.timeout))}",
                     "health checks time out, so the server is marked unhealthy and gets no traffic",
                     f"raise pools.{self.pool_name}.health.timeout, or make the health path answer faster")


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        async with asyncio.timeout(0.5):
            await writer.wait_closed()
    except (OSError, TimeoutError, ssl.SSLError, EOFError):
        pass


def _unverified_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


# ---- config smells -------------------------------------------------------------------------

def config_smells(cfg: Any, latencies: dict[tuple[str, str], float] | None = None) -> list[dict]:
    """Problems visible in the config itself, plus timeouts shorter than observed latency.
    `latencies`: (pool name, server url) -> seconds to the response head."""
    out: list[dict] = []

    def smell(severity: str, key: str, message: str) -> None:
        out.append({"severity": severity, "key": key, "message": message})

    latencies = latencies or {}
    for name, pool in cfg.pools.items():
        servers = list(pool.servers)
        where = f"pools.{name}"
        if not servers:
            smell("error", f"{where}.servers",
                  "the pool is empty (servers = []): every request routed to it gets 500 "
                  "proxy_configuration_error; add a server, or route elsewhere")
            continue
        retries = int(getattr(pool, "retries", 0) or 0)
        if len(servers) == 1 and retries > 0:
            smell("warning", f"{where}.retries",
                  f"retries = {retries} on a pool with one server: every retry goes back to the same "
                  "server, adding load exactly when it is failing; add a server or set retries = 0")
        if getattr(pool, "health", None) is None:
            passive = getattr(pool, "passive", None)
            smell("warning", f"{where}.health",
                  "no health checks ([" + where + ".health] is absent): a dead server is noticed only when "
                  "live requests fail on it" + ("" if passive is not None else
                                                ", and passive ejection is off too (max_fails = 0)"))
        primaries = [(i, s) for i, s in enumerate(servers) if not getattr(s, "backup", False)]
        total = sum(int(getattr(s, "weight", 1)) for _, s in primaries)
        if len(primaries) >= 2 and total > 0:
            i, top = max(primaries, key=lambda p: int(getattr(p[1], "weight", 1)))
            share = int(getattr(top, "weight", 1)) / total
            if share >= 0.9:
                smell("warning", f"{where}.servers[{i}].weight",
                      f"{top.url} carries {share:.0%} of the pool's weight ({top.weight} of {total}): the "
                      "other servers get almost no traffic, so their problems go unnoticed and they are "
                      "cold when it fails")
        for i, s in enumerate(servers):
            if getattr(s, "scheme", "") == "https" and not getattr(s, "tls_verify", True):
                smell("warning", f"{where}.servers[{i}].tls_verify",
                      f"tls_verify = false on {s.url}: its certificate is not checked, so anyone on the path "
                      "can impersonate it; set ca_file to its CA instead")
        health = getattr(pool, "health", None)
        for s in servers:
            latency = latencies.get((name, s.url))
            if latency is not None and health is not None and latency > float(health.timeout):
                smell("error", f"{where}.health.timeout",
                      f"health.timeout = {_s(float(health.timeout))} is shorter than the latency observed on "
                      f"{s.url} ({_ms(latency)}): its health checks fail")
    header = float(cfg.timeouts.response_header)
    slow = [(url, lat) for (_, url), lat in latencies.items() if lat is not None and lat > header]
    if slow:
        url, lat = max(slow, key=lambda x: x[1])
        others = f" (and {len(slow) - 1} more server{'s' if len(slow) > 2 else ''})" if len(slow) > 1 else ""
        smell("error", "timeouts.response_header",
              f"timeouts.response_header = {_s(header)} is shorter than the latency observed on {url} "
              f"({_ms(lat)}){others}: those requests end in 504")
    return out


# ---- the run -------------------------------------------------------------------------------

async def run_doctor(cfg: Any, *, resolver: Resolver | None = None,
                     now: Callable[[], float] | None = None) -> dict:
    """Probe every server of every pool concurrently; the SPEC "Doctor" report."""
    clock = now or time.perf_counter
    probes = [_Probe(cfg, name, pool, server, resolver, clock)
              for name, pool in cfg.pools.items() for server in pool.servers]
    run_bound = max((p.bound() for p in probes), default=1.0)
    tasks = [asyncio.ensure_future(p.run()) for p in probes]
    if tasks:
        done, pending = await asyncio.wait(tasks, timeout=run_bound)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
    for probe, task in zip(probes, tasks):
        if task.cancelled():
            probe.add("error", probe.check if probe.check in CHECKS else "http", None,
                      f"the {probe.check} check did not finish within {_s(round(run_bound, 1))}",
                      "the server (or the network to it) is stuck", "look at the upstream and the network")
        elif (exc := task.exception()) is not None:
            probe.add("error", probe.check, None, f"the doctor failed during the {probe.check} check: "
                                                  f"{type(exc).__name__}: {exc}",
                      "a bug in gatewise doctor", "report it with this output")
        await probe.aclose()
    servers = [p.report() for p in probes]
    latencies = {(p.pool_name, p.server.url): p.latency for p in probes if p.latency is not None}
    config = config_smells(cfg, latencies)
    ok = all(s["ok"] for s in servers) and not any(c["severity"] == "error" for c in config)
    return {"ok": ok, "servers": servers, "config": config}


# ---- text ----------------------------------------------------------------------------------

_SGR = {"error": "31", "warning": "33", "info": "32", "bold": "1", "dim": "2"}
_LABEL = {"error": "ERROR", "warning": "WARN", "info": "ok"}


def render_text(report: dict, *, color: bool) -> str:
    """The report for people: one block per server, findings aligned in columns; ANSI colour
    only when `color` (a terminal), plain text otherwise."""
    def paint(text: str, *styles: str) -> str:
        if not color or not styles:
            return text
        return "\x1b[" + ";".join(_SGR[s] for s in styles) + "m" + text + "\x1b[0m"

    servers = report.get("servers", [])
    config = report.get("config", [])
    everything = [f for s in servers for f in s.get("findings", [])]
    label_w = max((len(_LABEL.get(f["severity"], f["severity"])) for f in everything + config), default=5)
    check_w = max((len(f["check"]) for f in everything), default=7)
    pool_w = max((len(str(s.get("pool", ""))) for s in servers), default=0)
    url_w = max((len(str(s.get("url", ""))) for s in servers), default=0)
    pad = " " * (2 + label_w + 2 + check_w + 2)

    lines: list[str] = []
    bad = sum(1 for s in servers if not s.get("ok"))
    lines.append(paint(f"gatewise doctor: {len(servers)} server{'s' if len(servers) != 1 else ''}, "
                       + (f"{bad} with problems" if bad else "all reachable"), "bold"))
    for s in servers:
        lines.append("")
        state = paint("ok", "info", "bold") if s.get("ok") else paint("FAILED", "error", "bold")
        lines.append(f"{paint(str(s.get('pool', '')).ljust(pool_w), 'bold')}  "
                     f"{str(s.get('url', '')).ljust(url_w)}  {state}")
        for f in s.get("findings", []):
            sev = f["severity"]
            label = paint(_LABEL.get(sev, sev).ljust(label_w), sev)
            observed = f["observed"] + (f"  [{f['error']}]" if f.get("error") else "")
            if sev == "info":
                observed = paint(observed, "dim")
            lines.append(f"  {label}  {f['check'].ljust(check_w)}  {observed}")
            for tag, key in (("cause:", "likely_cause"), ("next:", "next_step"), ("try:", "suggestion")):
                if f.get(key):
                    value = paint(f[key], "bold") if key == "suggestion" else f[key]
                    lines.append(f"{pad}{paint(tag.ljust(7), 'dim')}{value}")
    if config:
        lines.append("")
        lines.append(paint("config", "bold"))
        key_w = max(len(c["key"]) for c in config)
        for c in config:
            sev = c["severity"]
            label = paint(_LABEL.get(sev, sev).ljust(label_w), sev)
            lines.append(f"  {label}  {c['key'].ljust(key_w)}  {c['message']}")
    counts = {sev: sum(1 for f in everything + config if f["severity"] == sev) for sev in ("error", "warning")}
    lines.append("")
    summary = (f"{counts['error']} error{'s' if counts['error'] != 1 else ''}, "
               f"{counts['warning']} warning{'s' if counts['warning'] != 1 else ''}: "
               + ("nothing is wrong (exit 0)" if report.get("ok") else "problems found (exit 1)"))
    lines.append(paint(summary, "bold", "info" if report.get("ok") else "error"))
    return "\n".join(lines) + "\n"


def _want_color(stream: Any) -> bool:
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def main_doctor(cfg: Any, as_json: bool) -> int:
    """`gatewise doctor -c FILE [--json]`: 0 when no error finding, 1 otherwise."""
    import orjson
    import uvloop   # what `gatewise run` uses

    try:
        report = uvloop.run(run_doctor(cfg))
    except KeyboardInterrupt:
        return 130
    if as_json:
        sys.stdout.buffer.write(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE))
        sys.stdout.flush()
    else:
        sys.stdout.write(render_text(report, color=_want_color(sys.stdout)))
        sys.stdout.flush()
    return 0 if report["ok"] else 1
