"""proxy/config.py: defaults, every problem kind, problem collection, CLI inputs, to_dict."""

from __future__ import annotations

import copy
import dataclasses
import json
import pathlib
import types

import pytest

from proxy.config import (
    AdminConfig, ConfigError, DiagnosticsConfig, HealthConfig, LimitsConfig, ListenConfig,
    PassiveConfig, PoolConfig, ProxyConfig, RouteConfig, ServerConfig, TimeoutsConfig,
    config_from_urls, load_config, parse_address, parse_config, to_dict,
)

CONF = pathlib.Path(__file__).resolve().parents[2] / "conf"


def base() -> dict:
    """A minimal valid document, fresh each call so tests can mutate it."""
    return {"pools": {"app": {"servers": [{"url": "http://127.0.0.1:9001"}]}}}


def problems_of(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert info.value.problems, "ConfigError without problems"
    assert all("\n" not in p for p in info.value.problems), "each problem must be one line"
    return info.value.problems


def only_problem(data: dict) -> str:
    problems = problems_of(data)
    assert len(problems) == 1, problems
    return problems[0]


# --- defaults ------------------------------------------------------------------------------

def test_minimal_document_gets_every_spec_default():
    cfg = parse_config(base())
    assert cfg.listen == ListenConfig(address="127.0.0.1:8080", host="127.0.0.1", port=8080,
                                      workers=1, parser="auto")
    assert cfg.admin == AdminConfig(address="127.0.0.1:9901", host="127.0.0.1", port=9901, token="")
    assert cfg.timeouts == TimeoutsConfig(connect=3.0, response_header=30.0, idle_read=30.0,
                                          client_header=10.0, client_idle=75.0, upstream_idle=60.0,
                                          shutdown_grace=10.0)
    assert cfg.limits == LimitsConfig(max_request_header_bytes=65536, max_response_header_bytes=65536,
                                      max_request_body_bytes=0, max_client_connections=10000)
    assert cfg.diagnostics == DiagnosticsConfig(proxy_name="gatewise", detail="full", recent_requests=256)
    pool = cfg.pools["app"]
    assert (pool.name, pool.balance, pool.retries, pool.retry_non_idempotent) == \
        ("app", "weighted_round_robin", 2, False)
    assert pool.health is None                        # no table: active checks disabled
    assert pool.passive == PassiveConfig(max_fails=3, fail_window=10.0, eject_for=30.0)
    assert pool.servers == (ServerConfig(url="http://127.0.0.1:9001", scheme="http", host="127.0.0.1",
                                         port=9001, weight=1, backup=False, tls_verify=True,
                                         ca_file=None, sni=None),)
    assert cfg.routes == (RouteConfig(host="*", path_prefix="/", pool="app", strip_prefix=False),)
    assert cfg.source is None


def test_empty_health_table_enables_checks_with_spec_defaults():
    data = base()
    data["pools"]["app"]["health"] = {}
    health = parse_config(data).pools["app"].health
    assert health == HealthConfig(path="/health", interval=2.0, timeout=1.0, rise=2, fall=3,
                                  expect_status=(200, 399))


def test_health_values_and_single_status():
    data = base()
    data["pools"]["app"]["health"] = {"path": "/ready", "interval": 5, "expect_status": "204"}
    health = parse_config(data).pools["app"].health
    assert health.path == "/ready"
    assert health.interval == 5.0 and isinstance(health.interval, float)
    assert health.expect_status == (204, 204)


def test_int_accepted_where_float_expected():
    data = base() | {"timeouts": {"connect": 3, "shutdown_grace": 1}}
    cfg = parse_config(data)
    assert cfg.timeouts.connect == 3.0 and type(cfg.timeouts.connect) is float
    assert type(cfg.timeouts.shutdown_grace) is float


def test_passive_max_fails_zero_disables_passive_ejection():
    data = base()
    data["pools"]["app"]["passive"] = {"max_fails": 0}
    assert parse_config(data).pools["app"].passive is None


def test_config_is_frozen_and_pools_keep_order():
    data = {"pools": {name: {"servers": [{"url": f"http://127.0.0.1:{9000 + i}"}]}
                      for i, name in enumerate(["zeta", "alpha", "mid"])},
            "routes": [{"pool": "alpha"}]}
    cfg = parse_config(data)
    assert list(cfg.pools) == ["zeta", "alpha", "mid"]
    assert isinstance(cfg.pools, types.MappingProxyType)
    with pytest.raises(TypeError):
        cfg.pools["new"] = cfg.pools["zeta"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.listen.port = 1
    assert isinstance(cfg.routes, tuple) and isinstance(cfg.pools["zeta"].servers, tuple)


# --- servers and addresses -----------------------------------------------------------------

@pytest.mark.parametrize("url, scheme, host, port, address", [
    ("http://127.0.0.1:9001", "http", "127.0.0.1", 9001, "127.0.0.1:9001"),
    ("http://Example.COM", "http", "example.com", 80, "example.com:80"),
    ("https://example.com/", "https", "example.com", 443, "example.com:443"),
    ("http://[::1]:9001", "http", "::1", 9001, "[::1]:9001"),
])
def test_server_url_parts_and_address(url, scheme, host, port, address):
    data = base()
    data["pools"]["app"]["servers"] = [{"url": url}]
    server = parse_config(data).pools["app"].servers[0]
    assert (server.url, server.scheme, server.host, server.port, server.address) == \
        (url, scheme, host, port, address)


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:8080", ("127.0.0.1", 8080)),
    ("0.0.0.0:0", ("0.0.0.0", 0)),
    ("[::1]:8080", ("::1", 8080)),
    ("LocalHost:65535", ("localhost", 65535)),
])
def test_parse_address_accepts(text, expected):
    assert parse_address(text) == expected


@pytest.mark.parametrize("text, reason", [
    ("nonsense", 'expected "host:port"'),
    (":8080", 'expected "host:port"'),
    ("127.0.0.1:", 'expected "host:port"'),
    ("127.0.0.1:http", 'expected "host:port"'),
    ("::1:8080", "IPv6 addresses need brackets"),
    ("127.0.0.1:65536", "port must be 0-65535"),
    ("[1.2.3.4]:80", "invalid host"),
    ("bad host:80", "invalid host"),
])
def test_parse_address_rejects_with_reason(text, reason):
    with pytest.raises(ValueError, match=reason):
        parse_address(text)


def test_ca_file_is_resolved_against_the_config_file(tmp_path):
    from tests.tlsutil import make_pki

    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "ca.pem").write_bytes(make_pki(tmp_path / "pki").ca.read_bytes())
    (tmp_path / "g.toml").write_text(
        '[[pools.app.servers]]\nurl = "https://api.internal"\nca_file = "certs/ca.pem"\nsni = "API.internal"\n'
        'tls_verify = false\n')
    server = load_config(str(tmp_path / "g.toml")).pools["app"].servers[0]
    assert server.ca_file == str(tmp_path / "certs" / "ca.pem")
    assert (server.sni, server.tls_verify, server.port) == ("API.internal", False, 443)


# --- problem kinds: each names its full key path ---------------------------------------------

def _set(path: str, value):
    """base() with one value set at a dotted path ("pools.app.servers.0.weight")."""
    data = base()
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    node[int(last) if isinstance(node, list) else last] = value
    return data


@pytest.mark.parametrize("path, value, expected", [
    ("pools.app.servers.0.weight", 0, "pools.app.servers[0].weight: must be an integer >= 1, got 0"),
    ("pools.app.servers.0.weight", True, "pools.app.servers[0].weight: must be an integer >= 1, got true"),
    ("pools.app.servers.0.weight", 1.5, "pools.app.servers[0].weight: must be an integer >= 1"),
    ("pools.app.servers.0.backup", "yes", 'pools.app.servers[0].backup: must be true or false, got "yes"'),
    ("listen.address", "nonsense", 'listen.address: expected "host:port", got "nonsense"'),
    ("admin.address", "127.0.0.1:70000", "admin.address: port must be 0-65535"),
    ("listen.workers", 0, "listen.workers: must be an integer >= 1"),
    ("listen.parser", "fast", 'listen.parser: must be one of "auto", "llhttp", "h11", got "fast"'),
    ("admin.token", 123, "admin.token: must be a string"),
    ("timeouts.connect", 0, "timeouts.connect: must be a number > 0, got 0"),
    ("timeouts.connect", -1.5, "timeouts.connect: must be a number > 0"),
    ("timeouts.idle_read", "30", 'timeouts.idle_read: must be a number > 0, got "30"'),
    ("timeouts.client_idle", True, "timeouts.client_idle: must be a number > 0, got true"),
    ("timeouts.upstream_idle", float("inf"), "timeouts.upstream_idle: must be a number > 0"),
    ("limits.max_request_body_bytes", -1, "limits.max_request_body_bytes: must be an integer >= 0"),
    ("limits.max_request_header_bytes", 0, "limits.max_request_header_bytes: must be an integer >= 1"),
    ("limits.max_client_connections", 1e4, "limits.max_client_connections: must be an integer >= 1"),
    ("diagnostics.detail", "verbose", 'diagnostics.detail: must be one of "full", "minimal"'),
    ("diagnostics.proxy_name", "my proxy", "diagnostics.proxy_name: must be a token"),
    ("diagnostics.recent_requests", -1, "diagnostics.recent_requests: must be an integer >= 0"),
    ("pools.app.balance", "round_robin",
     'pools.app.balance: must be one of "weighted_round_robin", "least_conn", "random", "p2c_ewma"'),
    ("pools.app.retries", -1, "pools.app.retries: must be an integer >= 0"),
    ("pools.app.retry_non_idempotent", 1, "pools.app.retry_non_idempotent: must be true or false"),
    ("pools.app.health.rise", 0, "pools.app.health.rise: must be an integer >= 1"),
    ("pools.app.health.fall", 0, "pools.app.health.fall: must be an integer >= 1"),
    ("pools.app.health.interval", 0, "pools.app.health.interval: must be a number > 0"),
    ("pools.app.health.timeout", -1, "pools.app.health.timeout: must be a number > 0"),
    ("pools.app.health.path", "health", 'pools.app.health.path: must be a path starting with "/"'),
    ("pools.app.health.expect_status", "2xx", "pools.app.health.expect_status: must be a status or range"),
    ("pools.app.health.expect_status", "399-200", "pools.app.health.expect_status: must be a status or range"),
    ("pools.app.health.expect_status", "200-700", "pools.app.health.expect_status: must be a status or range"),
    ("pools.app.passive.max_fails", -1, "pools.app.passive.max_fails: must be an integer >= 0"),
    ("pools.app.passive.eject_for", 0, "pools.app.passive.eject_for: must be a number > 0"),
    ("pools.app.health", "yes", 'pools.app.health: must be a table, got "yes"'),
    ("listen", 8080, "listen: must be a table, got 8080"),
    ("pools.app.servers", {"url": "http://a"}, "pools.app.servers: must be an array of tables"),
    ("routes", {"pool": "app"}, "routes: must be an array of tables"),
])
def test_bad_value_is_one_problem_naming_its_key(path, value, expected):
    assert only_problem(_set(path, value)).startswith(expected)


PATH_REASON = 'must not have a path, query or fragment (only "/" is allowed)'


@pytest.mark.parametrize("url, reason", [
    ("ftp://127.0.0.1:21", "scheme must be http or https"),
    ("127.0.0.1:9001", 'must start with "http://" or "https://"'),
    ("http://", "host required"),
    ("http://:9001", "host required"),
    ("http://127.0.0.1:0", "port must be 1-65535"),
    ("http://127.0.0.1:65536", "port must be 1-65535"),
    ("http://127.0.0.1:port", "port must be 1-65535"),
    ("http://127.0.0.1:9001/api", PATH_REASON),
    ("http://127.0.0.1:9001/?x=1", PATH_REASON),
    ("http://127.0.0.1:9001#frag", PATH_REASON),
    ("http://user:pw@127.0.0.1:9001", "credentials in URLs are not supported"),
    ("http://bad host", "invalid host"),
    (9001, "must be a URL string"),
])
def test_bad_server_url(url, reason):
    data = base()
    data["pools"]["app"]["servers"].append({"url": url})
    assert only_problem(data) == f"pools.app.servers[1].url: {reason}, got {json.dumps(url)}"


def test_server_without_url():
    data = base()
    data["pools"]["app"]["servers"].append({"weight": 2})
    assert only_problem(data) == "pools.app.servers[1].url: required"


def test_tls_settings_on_plain_http_server_are_problems():
    data = base()
    data["pools"]["app"]["servers"][0] |= {"sni": "x.example", "ca_file": "/nonexistent.pem"}
    problems = problems_of(data)
    assert "pools.app.servers[0].sni: only applies to https:// servers" in problems
    assert "pools.app.servers[0].ca_file: only applies to https:// servers" in problems
    assert 'pools.app.servers[0].ca_file: must name an existing file, got "/nonexistent.pem"' in problems


@pytest.mark.parametrize("where, key, expected", [
    ("pools.app", "retires", 'pools.app: unknown key "retires"; did you mean "retries"?'),
    ("pools.app.servers.0", "wieght", 'pools.app.servers[0]: unknown key "wieght"; did you mean "weight"?'),
    ("listen", "adress", 'listen: unknown key "adress"; did you mean "address"?'),
    ("timeouts", "conect", 'timeouts: unknown key "conect"; did you mean "connect"?'),
    ("pools.app.health", "intervall", 'pools.app.health: unknown key "intervall"; did you mean "interval"?'),
    ("pools.app.passive", "zzz", 'pools.app.passive: unknown key "zzz"'),
    ("diagnostics", "colour", 'diagnostics: unknown key "colour"'),
])
def test_unknown_keys_at_every_level(where, key, expected):
    assert only_problem(_set(f"{where}.{key}", 1)) == expected


def test_unknown_top_level_key_and_route_key():
    data = base() | {"limit": {}, "routes": [{"pool": "app", "prefix": "/x"}]}
    problems = problems_of(data)
    assert 'top level: unknown key "limit"; did you mean "limits"?' in problems
    assert any(p.startswith('routes[0]: unknown key "prefix"') for p in problems)
    assert len(problems) == 2


def test_duplicate_servers_in_a_pool():
    data = base()
    data["pools"]["app"]["servers"] += [{"url": "http://127.0.0.1:9002"}, {"url": "http://127.0.0.1:9001/"}]
    assert only_problem(data) == "pools.app.servers[2].url: same server as pools.app.servers[0].url"


def test_same_address_different_scheme_or_default_port_spelling():
    data = base()
    data["pools"]["app"]["servers"] = [{"url": "http://h"}, {"url": "http://h:80"}, {"url": "https://h:80"}]
    assert only_problem(data) == "pools.app.servers[1].url: same server as pools.app.servers[0].url"


def test_pool_without_servers_and_pool_of_only_backups():
    """`servers = []` is an intentionally empty pool (its routes answer 500
    proxy_configuration_error); a pool that forgets `servers` is a problem."""
    data = {"pools": {"a": {"servers": []}, "b": {},
                      "c": {"servers": [{"url": "http://127.0.0.1:1", "backup": True}]}},
            "routes": [{"pool": "a"}]}
    assert problems_of(data) == [
        "pools.b.servers: at least one server is required (or `servers = []` for an intentionally empty pool)",
        "pools.c.servers: every server is a backup; at least one must be primary",
    ]


def test_max_connections():
    data = base()
    data["pools"]["app"]["max_connections"] = -1
    assert only_problem(data).startswith("pools.app.max_connections: must be an integer >= 0")


def test_no_pools_at_all():
    assert only_problem({}).startswith("pools: at least one pool is required")


def test_bad_pool_name():
    data = {"pools": {"my app": base()["pools"]["app"]}}
    assert only_problem(data).startswith('pools.my app: pool names may contain only letters')


def test_admin_on_the_listen_port_is_a_problem():
    data = base() | {"listen": {"address": "0.0.0.0:8080"}, "admin": {"address": "127.0.0.1:8080"}}
    assert only_problem(data) == "admin.address: same port as listen.address"


def test_port_zero_is_fine_for_both_listeners_even_with_several_workers():
    # the supervisor reserves one port for all workers (proxy/supervisor.py)
    data = base() | {"listen": {"address": "127.0.0.1:0"}, "admin": {"address": "127.0.0.1:0"}}
    assert parse_config(data).listen.port == 0
    data["listen"]["workers"] = 2
    assert parse_config(data).listen.workers == 2


def test_many_problems_are_collected_not_just_the_first():
    data = {
        "listen": {"address": "nonsense", "workers": 0},
        "timeouts": {"connect": 0},
        "pools": {
            "app": {"retires": 3, "balance": "fastest",
                    "servers": [{"url": "http://127.0.0.1:9001", "weight": 0},
                                {"url": "ftp://x"}, {"url": "http://127.0.0.1:9001"}]},
            "api": {},
        },
        "routes": [{"pool": "nope", "path_prefix": "api"}],
    }
    problems = problems_of(data)
    expected_prefixes = [
        'listen.address: expected "host:port", got "nonsense"',
        "listen.workers: must be an integer >= 1",
        "timeouts.connect: must be a number > 0",
        'pools.app: unknown key "retires"; did you mean "retries"?',
        "pools.app.balance: must be one of",
        "pools.app.servers[0].weight: must be an integer >= 1",
        "pools.app.servers[1].url: scheme must be http or https",
        "pools.app.servers[2].url: same server as pools.app.servers[0].url",
        "pools.api.servers: at least one server is required (or `servers = []` for an intentionally empty pool)",
        'routes[0].path_prefix: must be a path starting with "/"',
        'routes[0].pool: no pool named "nope"',
    ]
    assert len(problems) == len(expected_prefixes), problems
    for line, prefix in zip(sorted(problems), sorted(expected_prefixes)):
        assert line.startswith(prefix), (line, prefix)


# --- routes ----------------------------------------------------------------------------------

def two_pools(routes=None) -> dict:
    data = {"pools": {"app": {"servers": [{"url": "http://127.0.0.1:9001"}]},
                      "api": {"servers": [{"url": "http://127.0.0.1:9002"}]}}}
    if routes is not None:
        data["routes"] = routes
    return data


def test_routes_required_with_several_pools():
    assert only_problem(two_pools()) == "routes: required when more than one pool is defined"


def test_implicit_route_only_for_a_single_pool():
    cfg = parse_config(base() | {"routes": []})
    assert cfg.routes == (RouteConfig(host="*", path_prefix="/", pool="app"),)


def test_explicit_routes_keep_order_and_values():
    cfg = parse_config(two_pools([
        {"host": "API.Example.com", "pool": "api"},
        {"host": "*.example.com", "path_prefix": "/static", "strip_prefix": True, "pool": "app"},
        {"pool": "app"},
    ]))
    assert cfg.routes == (
        RouteConfig(host="api.example.com", path_prefix="/", pool="api", strip_prefix=False),
        RouteConfig(host="*.example.com", path_prefix="/static", pool="app", strip_prefix=True),
        RouteConfig(host="*", path_prefix="/", pool="app", strip_prefix=False),
    )


def test_route_pool_typo_gets_a_suggestion():
    assert only_problem(two_pools([{"pool": "appp"}])) == 'routes[0].pool: no pool named "appp"; did you mean "app"?'


def test_route_without_pool():
    assert only_problem(two_pools([{"host": "*"}])) == "routes[0].pool: required"


@pytest.mark.parametrize("host", ["*", "example.com", "*.example.com", "127.0.0.1", "[::1]", "my_host"])
def test_route_host_accepted(host):
    assert parse_config(two_pools([{"host": host, "pool": "app"}])).routes[0].host == host


@pytest.mark.parametrize("host", ["example.com:8080", "*example.com", "a.*.com", "", "**", "[::1]:80", "bad host", 7])
def test_route_host_rejected(host):
    assert only_problem(two_pools([{"host": host, "pool": "app"}])).startswith(
        f'routes[0].host: must be "*", a host without port, or "*.example.com", got {json.dumps(host)}')


@pytest.mark.parametrize("prefix", ["api", "", "/a b", "/a?b"])
def test_route_path_prefix_rejected(prefix):
    assert only_problem(two_pools([{"path_prefix": prefix, "pool": "app"}])).startswith(
        'routes[0].path_prefix: must be a path starting with "/"')


# --- files -----------------------------------------------------------------------------------

def test_load_config_records_source(tmp_path):
    path = tmp_path / "g.toml"
    path.write_text('[[pools.app.servers]]\nurl = "http://127.0.0.1:9001"\n')
    assert load_config(str(path)).source == str(path)


def test_toml_syntax_error_is_one_line_with_file_name(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[listen\naddress = 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    [line] = info.value.problems
    assert line.startswith(f"{path}: invalid TOML: ")
    assert "line 1" in line


def test_missing_file(tmp_path):
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert info.value.problems == [f"{path}: cannot read: No such file or directory"]


def test_problems_from_a_file_name_their_keys(tmp_path):
    path = tmp_path / "g.toml"
    path.write_text('[pools.app]\nretires = 1\n[[pools.app.servers]]\nurl = "http://127.0.0.1:9001"\nweight = 0\n')
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert info.value.problems == [
        'pools.app: unknown key "retires"; did you mean "retries"?',
        "pools.app.servers[0].weight: must be an integer >= 1, got 0",
    ]
    assert str(info.value) == "\n".join(info.value.problems)


@pytest.mark.parametrize("path", sorted(CONF.rglob("*.toml")), ids=lambda p: p.relative_to(CONF).as_posix())
def test_every_shipped_config_loads(path):
    cfg = load_config(str(path))
    assert cfg.pools and cfg.routes
    assert all(route.pool in cfg.pools for route in cfg.routes)


def test_shipped_default_config_matches_the_brief():
    cfg = load_config(str(CONF / "gatewise.toml"))
    assert (cfg.listen.address, cfg.admin.address) == ("127.0.0.1:8080", "127.0.0.1:9901")
    assert [(s.address, s.weight) for s in cfg.pools["app"].servers] == [("127.0.0.1:9001", 3), ("127.0.0.1:9002", 1)]
    assert cfg.pools["app"].health == HealthConfig()
    assert cfg.routes == (RouteConfig(pool="app"),)
    # the file spells out every default; they must agree with the code's
    assert (cfg.timeouts, cfg.limits, cfg.diagnostics) == (TimeoutsConfig(), LimitsConfig(), DiagnosticsConfig())


def test_multi_route_example_has_a_backup_and_strip_prefix():
    cfg = load_config(str(CONF / "examples" / "multi-route.toml"))
    assert any(s.backup for s in cfg.pools["api"].servers)
    assert any(r.strip_prefix for r in cfg.routes)
    assert {r.host for r in cfg.routes} > {"*"}


# --- CLI inputs ------------------------------------------------------------------------------

@pytest.fixture
def conf_file(tmp_path):
    path = tmp_path / "g.toml"
    path.write_text('[listen]\naddress = "127.0.0.1:8080"\nworkers = 2\n'
                    '[[pools.app.servers]]\nurl = "http://127.0.0.1:9001"\n')
    return str(path)


def test_cli_overrides_replace_file_values(conf_file):
    cfg = load_config(conf_file, listen="[::1]:0", admin="127.0.0.1:0", workers=1)
    assert (cfg.listen.host, cfg.listen.port, cfg.listen.address) == ("::1", 0, "[::1]:0")
    assert (cfg.admin.host, cfg.admin.port) == ("127.0.0.1", 0)
    assert cfg.listen.workers == 1
    assert load_config(conf_file).listen.workers == 2      # no override: the file wins


def test_bad_cli_overrides_name_the_flags(conf_file):
    with pytest.raises(ConfigError) as info:
        load_config(conf_file, listen="nonsense", admin="1.2.3.4:99999", workers=0)
    assert sorted(info.value.problems) == [
        '--admin: port must be 0-65535, got "1.2.3.4:99999"',
        '--listen: expected "host:port", got "nonsense"',
        "--workers: must be an integer >= 1, got 0",
    ]


def test_to_urls_build_one_default_pool_with_weights():
    cfg = config_from_urls(["http://127.0.0.1:9001#weight=3", "https://api.example.com"], listen="127.0.0.1:0")
    assert list(cfg.pools) == ["default"]
    servers = cfg.pools["default"].servers
    assert [(s.url, s.address, s.weight) for s in servers] == [
        ("http://127.0.0.1:9001", "127.0.0.1:9001", 3), ("https://api.example.com", "api.example.com:443", 1)]
    assert cfg.routes == (RouteConfig(host="*", path_prefix="/", pool="default"),)
    assert cfg.listen.port == 0
    assert (cfg.timeouts, cfg.pools["default"].passive) == (TimeoutsConfig(), PassiveConfig())


def test_bad_to_urls_name_the_flag_and_index():
    with pytest.raises(ConfigError) as info:
        config_from_urls(["http://127.0.0.1:9001", "ftp://x", "http://127.0.0.1:9001#weight=0",
                          "http://127.0.0.1:9001"], listen="bad")
    problems = info.value.problems
    assert '--to[2]: only "#weight=N" (N >= 1) may follow the URL, got "http://127.0.0.1:9001#weight=0"' in problems
    assert '--listen: expected "host:port", got "bad"' in problems
    assert '--to[1]: scheme must be http or https, got "ftp://x"' in problems
    assert "--to[2]: same server as --to[0]" in problems
    assert "--to[3]: same server as --to[0]" in problems
    assert len(problems) == 5


def test_no_to_urls():
    with pytest.raises(ConfigError) as info:
        config_from_urls([])
    assert info.value.problems == ["--to: at least one URL is required"]


# --- to_dict ---------------------------------------------------------------------------------

def full_document() -> dict:
    data = two_pools([{"host": "*.example.com", "path_prefix": "/x", "strip_prefix": True, "pool": "api"},
                      {"pool": "app"}])
    data["admin"] = {"token": "s3cret"}
    data["pools"]["app"]["health"] = {"expect_status": "200"}
    data["pools"]["api"]["passive"] = {"max_fails": 0}
    data["pools"]["api"]["servers"].append({"url": "https://[::1]:8443", "backup": True, "sni": "api.local"})
    return data


def test_to_dict_redacts_the_admin_token_and_is_json():
    cfg = parse_config(full_document())
    out = to_dict(cfg)
    assert out["admin"]["token"] == "<redacted>"
    assert "s3cret" not in json.dumps(out)
    assert to_dict(cfg, redact=False)["admin"]["token"] == "s3cret"
    assert to_dict(parse_config(base()))["admin"]["token"] == ""    # nothing to hide: shown empty


def test_to_dict_round_trips_through_parse_config():
    cfg = parse_config(full_document())
    out = to_dict(cfg, redact=False)
    out.pop("source")
    assert parse_config(json.loads(json.dumps(out))) == cfg


def test_to_dict_does_not_alias_the_config():
    cfg = parse_config(full_document())
    out = to_dict(cfg)
    snapshot = copy.deepcopy(out)
    out["pools"]["app"]["servers"].clear()
    assert to_dict(cfg) == snapshot


def test_direct_construction_defaults_match_the_loader():
    """Modules that build configs in tests get the same meaning as an empty TOML table."""
    pool = PoolConfig(name="app", servers=())
    assert pool.passive == PassiveConfig() and pool.health is None
    assert ProxyConfig(pools={}, routes=()).listen == parse_config(base()).listen


def test_ca_file_that_is_not_a_certificate_bundle(tmp_path):
    """Regression: a ca_file that exists but is not PEM passed `check`; `run` then failed
    to start with a misleading listen_failed."""
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    data = base()
    data["pools"]["app"]["servers"][0] = {"url": "https://localhost:9443", "ca_file": str(bad)}
    assert only_problem(data).startswith("pools.app.servers[0].ca_file: not a usable PEM certificate bundle")
