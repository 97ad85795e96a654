"""Configuration: TOML (or `--to` URLs) -> frozen dataclasses, validated here and nowhere else.

Rules:
- Every key of SPEC.md "Config (TOML)" exists with its SPEC default; unknown keys at any level
  are problems (with a difflib "did you mean" hint), never silently dropped.
- Validation collects *all* problems and raises one ConfigError; each problem is one line that
  starts with the full key path (`pools.app.servers[1].weight: ...`), or with the CLI flag when
  the value came from one (`--listen: ...`, `--to[0]: ...`).
- Types are strict: bool is not an int, strings are not numbers; an int is accepted where a
  float is expected (3 -> 3.0). Non-finite numbers are rejected.
- Absent `[pools.X.health]` -> health None (no active checks). Absent `[pools.X.passive]` ->
  PassiveConfig() defaults; `max_fails = 0` -> passive None (disabled, as nginx max_fails=0).
- No `[[routes]]`: with exactly one pool an implicit catch-all route (host "*", prefix "/").
- Relative `ca_file` paths are resolved against the config file's directory, so a config
  works the same whatever the current directory is; the stored path is absolute.
- Beyond SPEC, caught here rather than at start: admin on the listen port,
  `ca_file`/`sni` on an http:// server, a port in a route host, duplicate servers.
- Problem lines end with `got <value>` as the user wrote it, when there is a value to show.
- Loading has no side effects beyond reading the config file (and checking `ca_file` exists).
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
import os
import re
import tomllib
import types
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

BALANCE = ("weighted_round_robin", "least_conn", "random", "p2c_ewma")
PARSERS = ("auto", "llhttp", "h11")
DETAILS = ("full", "minimal")
DEFAULT_PORTS = {"http": 80, "https": 443}


class ConfigError(Exception):
    """Invalid configuration; `.problems` holds one line per problem, each naming its key."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = list(problems)


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenConfig:
    address: str = "127.0.0.1:8080"
    host: str = "127.0.0.1"          # derived from address by the loader
    port: int = 8080                 # 0 = any free port (tests)
    workers: int = 1
    parser: str = "auto"


@dataclass(frozen=True, slots=True, kw_only=True)
class AdminConfig:
    address: str = "127.0.0.1:9901"  # loopback by default: /debug exposes internals
    host: str = "127.0.0.1"
    port: int = 9901
    token: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class TimeoutsConfig:                # all in seconds
    connect: float = 3.0
    response_header: float = 30.0
    idle_read: float = 30.0
    client_header: float = 10.0
    client_idle: float = 75.0        # nginx keepalive_timeout default
    upstream_idle: float = 60.0
    shutdown_grace: float = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitsConfig:
    max_request_header_bytes: int = 65536
    max_response_header_bytes: int = 65536
    max_request_body_bytes: int = 0  # 0 = unlimited
    max_client_connections: int = 10000


@dataclass(frozen=True, slots=True, kw_only=True)
class DiagnosticsConfig:
    proxy_name: str = "gatewise"
    detail: str = "full"
    recent_requests: int = 256       # 0 = keep none


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthConfig:
    path: str = "/health"
    interval: float = 2.0
    timeout: float = 1.0
    rise: int = 2
    fall: int = 3
    expect_status: tuple[int, int] = (200, 399)   # inclusive range


@dataclass(frozen=True, slots=True, kw_only=True)
class PassiveConfig:
    max_fails: int = 3
    fail_window: float = 10.0
    eject_for: float = 30.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig:
    url: str                         # as configured
    scheme: str
    host: str                        # lowercased; IPv6 without brackets
    port: int                        # explicit, or 80/443 by scheme
    weight: int = 1
    backup: bool = False
    tls_verify: bool = True
    ca_file: str | None = None       # None = system CAs
    sni: str | None = None           # None = the URL host

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolConfig:
    name: str
    balance: str = "weighted_round_robin"
    retries: int = 2
    retry_non_idempotent: bool = False
    # Requests in flight to the pool's servers at once; 0 = unlimited (nginx max_conns,
    # HAProxy maxconn). Over it: 503 connection_limit_reached, never a queue.
    max_connections: int = 0
    health: HealthConfig | None = None
    # Passive ejection is on unless disabled, like nginx (max_fails=1 fail_timeout=10s by
    # default): live traffic is the fastest health signal there is.
    passive: PassiveConfig | None = field(default_factory=PassiveConfig)
    servers: tuple[ServerConfig, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteConfig:
    host: str = "*"                  # "*", exact lowercased host (no port), or "*.example.com"
    path_prefix: str = "/"
    pool: str
    strip_prefix: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyConfig:
    listen: ListenConfig = field(default_factory=ListenConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    pools: Mapping[str, PoolConfig]  # types.MappingProxyType, config order kept
    routes: tuple[RouteConfig, ...]
    source: str | None = None        # the file it came from, if any


# --- value rules: (kind, predicate, requirement shown to the user) -------------------------

Rule = tuple[str, Callable[[Any], bool], str]
POSITIVE: Rule = ("float", lambda v: v > 0, "must be a number > 0")
BOOL: Rule = ("bool", lambda v: True, "must be true or false")
PATH: Rule = ("str", lambda v: v.startswith("/") and not re.search(r"[\s?#]", v),
              'must be a path starting with "/" (no spaces, "?" or "#")')


def _at_least(n: int) -> Rule:
    return ("int", lambda v: v >= n, f"must be an integer >= {n}")


def _one_of(options: tuple[str, ...]) -> Rule:
    return ("str", lambda v: v in options, "must be one of " + ", ".join(map(json.dumps, options)))


# Proxy-Status member names (RFC 9209 / RFC 8941 sf-token) and Via pseudonyms (RFC 9110
# 7.6.3 token) must both accept it, so: a token that starts with a letter.
_TOKEN = re.compile(r"[A-Za-z][A-Za-z0-9!#$%&'*+.^_`|~-]*")
_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?")      # DNS-ish name or IPv4 literal
_POOL_NAME = re.compile(r"[A-Za-z0-9_-]+")                   # keeps key paths unambiguous


def _has_kind(kind: str, v: Any) -> bool:
    if kind == "float":
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if kind == "int":
        return isinstance(v, int) and not isinstance(v, bool)
    return isinstance(v, {"bool": bool, "str": str}[kind])


def _show(v: Any) -> str:
    """A value as the user wrote it in TOML, for "got ..." in problem lines."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, Mapping):
        return "a table"
    if isinstance(v, list):
        return "an array"
    return json.dumps(v) if isinstance(v, str) else str(v)


def _did_you_mean(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f'; did you mean "{close[0]}"?' if close else ""


def _valid_host(host: str) -> bool:
    if ":" in host:
        try:
            return isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address)
        except ValueError:
            return False
    return bool(_NAME.fullmatch(host))


def _unusable_ca(path: str) -> str | None:
    """Why a CA bundle cannot be loaded, or None (reading it has no side effect)."""
    import ssl

    try:
        ssl.create_default_context(cafile=path)
    except (ssl.SSLError, OSError, ValueError) as exc:
        return f"not a usable PEM certificate bundle: {exc}"
    return None


def parse_address(text: str) -> tuple[str, int]:
    """"host:port" or "[v6]:port" -> (host, port); port 0 allowed (bind any free port)."""
    if not isinstance(text, str):
        raise ValueError('expected "host:port"')
    m = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]]+):(\d+)", text)
    if not m:
        if text.count(":") > 1 and not text.startswith("["):
            raise ValueError('IPv6 addresses need brackets, e.g. "[::1]:8080"')
        raise ValueError('expected "host:port"')
    host, port = (m[1], m[2]) if m[1] is not None else (m[3].lower(), m[4])
    if not _valid_host(host) or (m[1] is not None and ":" not in host):
        raise ValueError("invalid host")
    if int(port) > 65535:
        raise ValueError("port must be 0-65535")
    return host, int(port)


def _route_host_ok(host: str) -> bool:
    """"*", "*.example.com", an exact host, or a bracketed IPv6 literal; never a port,
    because routes match the Host header with its port removed."""
    name = host.lower().removeprefix("*.")
    if name.startswith("["):
        return host[0] == "[" and host.endswith("]") and ":" in host and _valid_host(name[1:-1])
    return host == "*" or bool(_NAME.fullmatch(name))


def _status_range(text: str) -> tuple[int, int] | None:
    m = re.fullmatch(r"([1-5]\d\d)(?:-([1-5]\d\d))?", text)
    return (int(m[1]), int(m[2] or m[1])) if m and int(m[1]) <= int(m[2] or m[1]) else None


_RULES: dict[type, dict[str, Rule]] = {
    ListenConfig: {"workers": _at_least(1), "parser": _one_of(PARSERS)},
    AdminConfig: {"token": ("str", lambda v: True, "must be a string")},
    TimeoutsConfig: {f.name: POSITIVE for f in fields(TimeoutsConfig)},
    LimitsConfig: {"max_request_header_bytes": _at_least(1), "max_response_header_bytes": _at_least(1),
                   "max_request_body_bytes": _at_least(0), "max_client_connections": _at_least(1)},
    DiagnosticsConfig: {"proxy_name": ("str", _TOKEN.fullmatch, "must be a token such as \"gatewise\""),
                        "detail": _one_of(DETAILS), "recent_requests": _at_least(0)},
    HealthConfig: {"path": PATH, "interval": POSITIVE, "timeout": POSITIVE,
                   "rise": _at_least(1), "fall": _at_least(1),
                   "expect_status": ("str", _status_range, 'must be a status or range like "200-399"')},
    PassiveConfig: {"max_fails": _at_least(0), "fail_window": POSITIVE, "eject_for": POSITIVE},
    PoolConfig: {"balance": _one_of(BALANCE), "retries": _at_least(0), "retry_non_idempotent": BOOL,
                 "max_connections": _at_least(0)},
    ServerConfig: {"weight": _at_least(1), "backup": BOOL, "tls_verify": BOOL,
                   "sni": ("str", lambda v: _NAME.fullmatch(v.lower()), "must be a host name")},
    RouteConfig: {"host": ("str", _route_host_ok, 'must be "*", a host without port, or "*.example.com"'),
                  "path_prefix": PATH, "strip_prefix": BOOL},
}
_SPECIAL = {ListenConfig: ("address",), AdminConfig: ("address",),
            PoolConfig: ("health", "passive", "servers"), ServerConfig: ("url", "ca_file"),
            RouteConfig: ("pool",)}
_TOP = ("listen", "admin", "timeouts", "limits", "diagnostics", "pools", "routes")


class _Loader:
    """One validation pass: walks the whole tree, appending problems instead of raising."""

    def __init__(self, source: str | None, labels: Mapping[str, str] | None = None):
        self.source = source
        self.labels = labels or {}     # key path -> CLI flag the value came from
        self.problems: list[str] = []

    def problem(self, key: str, message: str) -> None:
        self.problems.append(f"{self.labels.get(key, key)}: {message}")

    def table(self, value: Any, key: str) -> Mapping | None:
        if isinstance(value, Mapping):
            return value
        self.problem(key, f"must be a table, got {_show(value)}")
        return None

    def section(self, cls: type, table: Mapping, where: str) -> dict[str, Any]:
        """Check plain keys of `cls` by their rules; report unknown keys; return valid kwargs."""
        rules, special = _RULES.get(cls, {}), _SPECIAL.get(cls, ())
        kwargs: dict[str, Any] = {}
        for key, value in table.items():
            if key in rules:
                kind, ok, requirement = rules[key]
                if _has_kind(kind, value) and ok(value):
                    kwargs[key] = float(value) if kind == "float" else value
                else:
                    self.problem(f"{where}.{key}", f"{requirement}, got {_show(value)}")
            elif key not in special:
                self.problem(where, f'unknown key "{key}"{_did_you_mean(key, [*rules, *special])}')
        return kwargs

    def address(self, table: Mapping, where: str, kwargs: dict[str, Any]) -> None:
        """listen.address / admin.address -> address (normalized), host, port."""
        if "address" in table:
            text = table["address"]
            try:
                host, port = parse_address(text)
            except ValueError as exc:
                self.problem(f"{where}.address", f"{exc}, got {_show(text)}")
            else:
                shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
                kwargs.update(address=shown, host=host, port=port)

    def url(self, text: Any, key: str) -> dict[str, Any] | None:
        """Check one upstream URL; return scheme/host/port, or None after reporting why."""
        why = None
        try:
            parts = urlsplit(text) if isinstance(text, str) else None
            port = parts.port if parts else None
        except ValueError:
            parts, why = None, "port must be 1-65535"
        if parts is None:
            why = why or "must be a URL string"
        elif "://" not in text:
            why = 'must start with "http://" or "https://"'
        elif parts.scheme not in DEFAULT_PORTS:
            why = "scheme must be http or https"
        elif not parts.hostname:
            why = "host required"
        elif not _valid_host(parts.hostname):
            why = "invalid host"
        elif parts.username is not None:
            why = "credentials in URLs are not supported"
        elif port == 0:
            why = "port must be 1-65535"
        elif parts.path not in ("", "/") or parts.query or parts.fragment or "?" in text or "#" in text:
            why = 'must not have a path, query or fragment (only "/" is allowed)'
        if why:
            self.problem(key, f"{why}, got {_show(text)}")
            return None
        return {"scheme": parts.scheme, "host": parts.hostname, "port": port or DEFAULT_PORTS[parts.scheme]}

    def server(self, table: Mapping, where: str) -> ServerConfig | None:
        kwargs = self.section(ServerConfig, table, where)
        if "url" not in table:
            self.problem(f"{where}.url", "required")
            return None
        parts = self.url(table["url"], f"{where}.url")
        if parts and parts["scheme"] == "http":
            for key in ("ca_file", "sni"):
                if key in table:   # the user expects TLS; silently ignoring would hide that
                    self.problem(f"{where}.{key}", "only applies to https:// servers")
        if "ca_file" in table:
            value = table["ca_file"]
            base = os.path.dirname(os.path.abspath(self.source)) if self.source else os.getcwd()
            path = os.path.join(base, value) if isinstance(value, str) and value else None
            if path and os.path.isfile(path):
                kwargs["ca_file"] = os.path.normpath(path)
                if why := _unusable_ca(path):  # found at load time, never as a failed start
                    self.problem(f"{where}.ca_file", why)
            else:
                self.problem(f"{where}.ca_file", f"must name an existing file, got {_show(value)}")
        return ServerConfig(url=table["url"], **parts, **kwargs) if parts else None

    def pool(self, name: str, value: Any, where: str) -> PoolConfig | None:
        if not _POOL_NAME.fullmatch(name):
            self.problem(where, 'pool names may contain only letters, digits, "-" and "_"')
        if (table := self.table(value, where)) is None:
            return None
        kwargs = self.section(PoolConfig, table, where)
        if "health" in table and (health := self.table(table["health"], f"{where}.health")) is not None:
            h = self.section(HealthConfig, health, f"{where}.health")
            if "expect_status" in h:
                h["expect_status"] = _status_range(h["expect_status"])
            kwargs["health"] = HealthConfig(**h)
        if "passive" in table and (passive := self.table(table["passive"], f"{where}.passive")) is not None:
            p = PassiveConfig(**self.section(PassiveConfig, passive, f"{where}.passive"))
            kwargs["passive"] = p if p.max_fails > 0 else None
        raw = table.get("servers", [])
        if not isinstance(raw, list):
            self.problem(f"{where}.servers", f"must be an array of tables, got {_show(raw)}")
            return None
        servers: list[ServerConfig] = []
        seen: dict[tuple, str] = {}
        for i, item in enumerate(raw):
            key = f"{where}.servers[{i}]"
            if (item := self.table(item, key)) is None or (server := self.server(item, key)) is None:
                continue
            ident = (server.scheme, server.host, server.port)
            if ident in seen:
                self.problem(f"{key}.url", f"same server as {self.labels.get(seen[ident], seen[ident])}")
            seen.setdefault(ident, f"{key}.url")
            servers.append(server)
        if "servers" not in table:
            # `servers = []` is allowed on purpose (a pool emptied for maintenance): its
            # routes answer 500 proxy_configuration_error, as SPEC says.
            self.problem(f"{where}.servers", "at least one server is required (or `servers = []` for an "
                                             "intentionally empty pool)")
        elif servers and len(servers) == len(raw) and all(s.backup for s in servers):
            self.problem(f"{where}.servers", "every server is a backup; at least one must be primary")
        return PoolConfig(name=name, servers=tuple(servers), **kwargs)

    def route(self, table: Mapping, where: str, pools: Mapping) -> RouteConfig:
        kwargs = self.section(RouteConfig, table, where)
        if "host" in kwargs:
            kwargs["host"] = kwargs["host"].lower()
        pool = table.get("pool")
        if pool is None:
            self.problem(f"{where}.pool", "required")
        elif not isinstance(pool, str) or pool not in pools:
            self.problem(f"{where}.pool", f"no pool named {_show(pool)}{_did_you_mean(str(pool), pools)}")
        return RouteConfig(pool=str(pool), **kwargs)

    def config(self, data: Mapping) -> ProxyConfig:
        sections: dict[str, Any] = {}
        for key, cls in (("listen", ListenConfig), ("admin", AdminConfig), ("timeouts", TimeoutsConfig),
                         ("limits", LimitsConfig), ("diagnostics", DiagnosticsConfig)):
            if (table := self.table(data.get(key, {}), key)) is not None:
                kwargs = self.section(cls, table, key)
                if cls in (ListenConfig, AdminConfig):
                    self.address(table, key, kwargs)
                sections[key] = cls(**kwargs)
        for key in [k for k in data if k not in _TOP]:
            self.problem("top level", f'unknown key "{key}"{_did_you_mean(key, _TOP)}')
        listen, admin = sections.get("listen"), sections.get("admin")
        if listen and admin and listen.port == admin.port != 0 and (
                listen.host == admin.host or {listen.host, admin.host} & {"0.0.0.0", "::"}):
            # the second bind would fail at start; say so now, naming both keys
            listen_key = self.labels.get("listen.address", "listen.address")
            self.problem("admin.address", f"same port as {listen_key}")

        pools_table = self.table(data.get("pools", {}), "pools")
        if pools_table == {}:
            self.problem("pools", "at least one pool is required ([pools.NAME] with [[pools.NAME.servers]])")
        pools = {name: self.pool(name, value, f"pools.{name}") for name, value in (pools_table or {}).items()}

        raw_routes = data.get("routes", [])
        routes: list[RouteConfig] = []
        if not isinstance(raw_routes, list):
            self.problem("routes", f"must be an array of tables ([[routes]]), got {_show(raw_routes)}")
        elif not raw_routes and len(pools) == 1:
            routes.append(RouteConfig(pool=next(iter(pools))))   # the obvious meaning of one pool
        elif not raw_routes and pools:
            self.problem("routes", "required when more than one pool is defined")
        for i, item in enumerate(raw_routes if isinstance(raw_routes, list) else []):
            if (table := self.table(item, f"routes[{i}]")) is not None:
                routes.append(self.route(table, f"routes[{i}]", pools))

        if self.problems:
            raise ConfigError(self.problems)
        return ProxyConfig(**sections, pools=types.MappingProxyType(pools), routes=tuple(routes),
                           source=self.source)


def parse_config(data: Mapping, *, source: str | None = None) -> ProxyConfig:
    """Validate an already-parsed TOML document."""
    return _Loader(source).config(data)


def load_config(path: str, *, listen: str | None = None, admin: str | None = None,
                workers: int | None = None) -> ProxyConfig:
    """Read and validate a TOML file; CLI overrides replace their keys before validation."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: cannot read: not UTF-8 text"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: invalid TOML: {exc}"]) from None
    labels = {}
    for section, key, flag, value in (("listen", "address", "--listen", listen),
                                      ("admin", "address", "--admin", admin),
                                      ("listen", "workers", "--workers", workers)):
        if value is not None and isinstance(data.get(section, {}), Mapping):
            data[section] = {**data.get(section, {}), key: value}
            labels[f"{section}.{key}"] = flag
    return _Loader(path, labels).config(data)


def config_from_urls(urls: list[str], *, listen: str | None = None, admin: str | None = None,
                     workers: int | None = None) -> ProxyConfig:
    """`gatewise run --to URL...`: one pool "default" of these servers, one catch-all route."""
    if not urls:
        raise ConfigError(["--to: at least one URL is required"])
    servers, labels, problems = [], {}, []
    for i, url in enumerate(urls):
        base, _, fragment = url.partition("#")
        server: dict[str, Any] = {"url": base}
        if fragment:
            m = re.fullmatch(r"weight=(\d+)", fragment)
            if m and int(m[1]) >= 1:
                server["weight"] = int(m[1])
            else:
                problems.append(f'--to[{i}]: only "#weight=N" (N >= 1) may follow the URL, got {_show(url)}')
        servers.append(server)
        labels[f"pools.default.servers[{i}].url"] = f"--to[{i}]"
    data: dict[str, Any] = {"pools": {"default": {"servers": servers}}}
    if listen is not None:
        data["listen"] = {"address": listen}
        labels["listen.address"] = "--listen"
    if workers is not None:
        data.setdefault("listen", {})["workers"] = workers
        labels["listen.workers"] = "--workers"
    if admin is not None:
        data["admin"] = {"address": admin}
        labels["admin.address"] = "--admin"
    loader = _Loader(None, labels)
    loader.problems.extend(problems)   # config() raises with these plus whatever else it finds
    return loader.config(data)


def to_dict(cfg: ProxyConfig, *, redact: bool = True) -> dict:
    """The effective config as a plain, JSON-able dict shaped like the TOML file.

    Derived fields (host/port, scheme) are left out, so `parse_config(to_dict(cfg,
    redact=False))` gives back an equal config (minus "source").
    """
    def plain(obj: Any, skip: tuple[str, ...] = ()) -> dict:
        out = {}
        for f in fields(obj):
            value = getattr(obj, f.name)
            if f.name not in skip and value is not None:
                out[f.name] = value
        return out

    listen = plain(cfg.listen, ("host", "port"))
    admin = plain(cfg.admin, ("host", "port"))
    if redact and admin["token"]:
        admin["token"] = "<redacted>"
    pools = {}
    for name, pool in cfg.pools.items():
        p = plain(pool, ("name", "health", "passive", "servers"))
        if pool.health:
            lo, hi = pool.health.expect_status
            p["health"] = plain(pool.health) | {"expect_status": f"{lo}" if lo == hi else f"{lo}-{hi}"}
        p["passive"] = plain(pool.passive) if pool.passive else {"max_fails": 0}
        p["servers"] = [plain(s, ("scheme", "host", "port")) for s in pool.servers]
        pools[name] = p
    return {"listen": listen, "admin": admin, "timeouts": plain(cfg.timeouts), "limits": plain(cfg.limits),
            "diagnostics": plain(cfg.diagnostics), "pools": pools,
            "routes": [plain(r) for r in cfg.routes], "source": cfg.source}


# -- writing a config dict back as TOML (gatewise demo's temp file, the tests) ---------

def _toml_scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)   # a JSON string with these characters is a valid TOML basic string
    raise TypeError(f"no TOML for {v!r}")


def _toml_key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else json.dumps(k)


def to_toml(data: Mapping[str, Any]) -> str:
    """The config dict (scalars, tables, arrays of tables) as a TOML document."""
    out: list[str] = []

    def table(path: list[str], t: Mapping[str, Any], header: str | None) -> None:
        scalars = [(k, v) for k, v in t.items() if not isinstance(v, (Mapping, list))]
        if header is not None:
            out.extend(["", header] if out else [header])
        out.extend(f"{_toml_key(k)} = {_toml_scalar(v)}" for k, v in scalars)
        for k, v in t.items():
            sub = [*path, _toml_key(k)]
            if isinstance(v, Mapping):
                only_tables = bool(v) and all(isinstance(x, Mapping) for x in v.values())
                table(sub, v, None if only_tables else f"[{'.'.join(sub)}]")
            elif isinstance(v, list):
                for item in v:
                    table(sub, item, f"[[{'.'.join(sub)}]]")

    table([], data, None)
    return "\n".join(out) + "\n"
