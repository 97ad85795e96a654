"""proxy.router: route matching, strip_prefix rewriting, absolute-form splitting."""

from __future__ import annotations

import pytest

from proxy.router import Route, Router, rewrite_target, split_target


def route(host: str = "*", prefix: str = "/", pool: str = "p", strip: bool = False) -> Route:
    return Route(host=host, path_prefix=prefix, pool=pool, strip_prefix=strip)


def pool_of(router: Router, host, path: bytes) -> str | None:
    r = router.match(host, path)
    return None if r is None else r.pool


# -- precedence -------------------------------------------------------------------


def test_first_match_wins_in_config_order():
    router = Router([route(prefix="/", pool="all"), route(prefix="/api", pool="api")])
    assert pool_of(router, b"x", b"/api/users") == "all"
    router = Router([route(prefix="/api", pool="api"), route(prefix="/", pool="all")])
    assert pool_of(router, b"x", b"/api/users") == "api"
    assert pool_of(router, b"x", b"/other") == "all"


@pytest.mark.parametrize("host", [None, b"", b"a.example", b"[::1]:8080"])
@pytest.mark.parametrize("path", [b"/", b"/api/x?q", b"*"])
def test_a_first_route_for_everything_takes_every_request(host, path):
    """The single-site setup: the first route has host "*" and prefix "/", so it wins
    whatever the request and whatever follows it."""
    router = Router([route(pool="all"), route(host="a.example", prefix="/api", pool="api")])
    assert pool_of(router, host, path) == "all"
    router = Router([route(host="a.example", pool="a"), route(pool="all")])
    assert pool_of(router, host, path) == ("a" if host == b"a.example" else "all")


def test_host_and_path_must_both_match():
    router = Router(
        [
            route(host="api.example.com", prefix="/v1", pool="v1"),
            route(host="api.example.com", pool="api"),
            route(pool="default"),
        ]
    )
    assert pool_of(router, b"api.example.com", b"/v1/x") == "v1"
    assert pool_of(router, b"api.example.com", b"/v2/x") == "api"
    assert pool_of(router, b"www.example.com", b"/v1/x") == "default"


def test_no_match_returns_none():
    router = Router([route(host="a.example", pool="a"), route(prefix="/api", pool="api")])
    assert router.match(b"b.example", b"/web") is None
    assert Router([]).match(b"x", b"/") is None


# -- hosts ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host, expected",
    [
        (b"a.example.com", "wild"),
        (b"a.b.example.com", "wild"),
        (b"A.Example.COM", "wild"),
        (b"a.example.com:8443", "wild"),
        (b"a.example.com.", "wild"),
        (b"example.com", "apex"),
        (b"notexample.com", None),
        (b".example.com", None),
        (b"example.com.evil", None),
    ],
)
def test_wildcard_hosts(host, expected):
    router = Router([route(host="*.example.com", pool="wild"), route(host="example.com", pool="apex")])
    assert pool_of(router, host, b"/") == expected


@pytest.mark.parametrize(
    "host",
    [
        b"api.example.com",
        b"API.Example.Com",
        b"api.example.com:8080",
        b"api.example.com.",
        b"api.example.com.:8080",
        "api.example.com",
        "Api.Example.com:80",
    ],
)
def test_exact_host_normalization(host):
    router = Router([route(host="api.example.com", pool="api")])
    assert pool_of(router, host, b"/") == "api"


def test_exact_host_pattern_is_normalized_too():
    router = Router([route(host="API.Example.com.", pool="api")])
    assert pool_of(router, b"api.example.com", b"/") == "api"


@pytest.mark.parametrize(
    "pattern, host, ok",
    [
        ("[::1]", b"[::1]:8080", True),
        ("[::1]", b"[::1]", True),
        ("::1", b"[::1]:8080", True),
        ("[2001:db8::1]", b"[2001:DB8::1]", True),
        ("[::1]", b"[::2]:8080", False),
        ("127.0.0.1", b"127.0.0.1:8080", True),
        ("127.0.0.1", b"127.0.0.2", False),
    ],
)
def test_ip_literals(pattern, host, ok):
    router = Router([route(host=pattern, pool="ip")])
    assert (pool_of(router, host, b"/") == "ip") is ok


@pytest.mark.parametrize("host", [None, b"", b"  ", ""])
def test_missing_host_matches_only_star(host):
    router = Router(
        [route(host="api.example.com", pool="exact"), route(host="*.example.com", pool="wild"), route(pool="any")]
    )
    assert pool_of(router, host, b"/") == "any"
    assert pool_of(Router([route(host="api.example.com", pool="exact")]), host, b"/") is None


def test_star_matches_any_host():
    router = Router([route(host="*", pool="any")])
    for host in (b"anything", b"[::1]:1", None, "str.host"):
        assert pool_of(router, host, b"/x") == "any"


def test_many_distinct_hosts_keep_working():
    """The normalized-host cache is bounded; past the bound matching stays correct."""
    router = Router([route(host="*.example.com", pool="wild")])
    for i in range(3000):
        assert pool_of(router, f"h{i}.example.com".encode(), b"/") == "wild"
        assert pool_of(router, f"h{i}.example.org".encode(), b"/") is None


@pytest.mark.parametrize("pattern", ["foo.*.com", "*foo.com", "a*", "*.", ":80"])
def test_bad_host_patterns_rejected(pattern):
    with pytest.raises(ValueError):
        Router([route(host=pattern)])


# -- paths ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, ok",
    [
        (b"/api", True),
        (b"/api/", True),
        (b"/api/x", True),
        (b"/api/x/y?z=1", True),
        (b"/api?q=1", True),
        (b"/api?q=/apix", True),
        (b"/apix", False),
        (b"/apix/y", False),
        (b"/ap", False),
        (b"/API", False),
        (b"/", False),
        (b"/v1/api", False),
        (b"/x?/api", False),
    ],
)
def test_prefix_segment_boundary(path, ok):
    router = Router([route(prefix="/api", pool="api")])
    assert (pool_of(router, b"h", path) == "api") is ok


@pytest.mark.parametrize("path, ok", [(b"/api/", True), (b"/api/x", True), (b"/api", False), (b"/apix", False)])
def test_prefix_with_trailing_slash(path, ok):
    router = Router([route(prefix="/api/", pool="api")])
    assert (pool_of(router, b"h", path) == "api") is ok


def test_multi_segment_prefix():
    router = Router([route(prefix="/api/v1", pool="v1")])
    assert pool_of(router, b"h", b"/api/v1/users") == "v1"
    assert pool_of(router, b"h", b"/api/v1") == "v1"
    assert pool_of(router, b"h", b"/api/v10") is None
    assert pool_of(router, b"h", b"/api") is None


@pytest.mark.parametrize("prefix", ["/", ""])
@pytest.mark.parametrize("path", [b"/", b"/anything/at/all?x", b"*", b"/?q"])
def test_root_prefix_matches_all(prefix, path):
    assert pool_of(Router([route(prefix=prefix, pool="all")]), b"h", path) == "all"


def test_matching_is_on_raw_bytes():
    router = Router([route(prefix="/api", pool="api")])
    assert pool_of(router, b"h", b"/%61pi") is None


def test_bad_prefix_rejected():
    with pytest.raises(ValueError):
        Router([route(prefix="api")])


# -- strip_prefix -----------------------------------------------------------------


@pytest.mark.parametrize(
    "prefix, strip, target, expected",
    [
        ("/api", True, b"/api/users?x=1", b"/users?x=1"),
        ("/api", True, b"/api/users", b"/users"),
        ("/api", True, b"/api", b"/"),
        ("/api", True, b"/api/", b"/"),
        ("/api", True, b"/api?x=1&y=/api", b"/?x=1&y=/api"),
        ("/api", True, b"/api/a/api/b", b"/a/api/b"),
        ("/api/", True, b"/api/users?x", b"/users?x"),
        ("/api/", True, b"/api/", b"/"),
        ("/api/v1", True, b"/api/v1/x", b"/x"),
        ("/", True, b"/x?y", b"/x?y"),
        ("/api", False, b"/api/users?x=1", b"/api/users?x=1"),
    ],
)
def test_rewrite_target(prefix, strip, target, expected):
    r = route(prefix=prefix, strip=strip)
    assert Router([r]).match(b"h", target) is r  # every row is a real match
    assert rewrite_target(r, target) == expected


def test_rewrite_without_strip_returns_same_object():
    target = b"/api/x"
    assert rewrite_target(route(prefix="/api"), target) is target


# -- absolute-form ----------------------------------------------------------------


@pytest.mark.parametrize(
    "target, expected",
    [
        (b"/p?q", (None, b"/p?q")),
        (b"/", (None, b"/")),
        (b"*", (None, b"*")),
        (b"http://example.com/p?q=1", (b"example.com", b"/p?q=1")),
        (b"http://example.com:8080/a/b", (b"example.com:8080", b"/a/b")),
        (b"https://example.com", (b"example.com", b"/")),
        (b"HTTP://Example.com/x", (b"Example.com", b"/x")),
        (b"http://example.com?q", (b"example.com", b"/?q")),
        (b"http://[::1]:8080/x", (b"[::1]:8080", b"/x")),
    ],
)
def test_split_target(target, expected):
    assert split_target(target) == expected


@pytest.mark.parametrize(
    "target",
    [
        b"ftp://example.com/x",
        b"example.com:443",
        b"http:///x",
        b"http://:80/x",
        b"http://user:pw@example.com/",
        b"http://example.com/x#frag",
        b"",
    ],
)
def test_split_target_rejects(target):
    with pytest.raises(ValueError):
        split_target(target)


def test_absolute_form_routes_on_its_authority():
    router = Router([route(host="api.example.com", prefix="/v1", pool="api"), route(pool="default")])
    authority, path = split_target(b"http://API.example.com:80/v1/x?y")
    assert pool_of(router, authority, path) == "api"
