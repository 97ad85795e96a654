"""diagnostics/hints.py: what a person should check next, written with the real values."""

from __future__ import annotations

import dataclasses
import re

import pytest

from diagnostics.causes import Cause
from diagnostics.hints import HINTS, LIMIT_KEYS, TIMEOUT_KEYS, HintContext, hint_for

# Being added to causes.py alongside TLS and DNS support (issue 4); hints are keyed by value.
NEW_CAUSES = ["dns_error", "dns_timeout", "tls_certificate", "tls_protocol", "tls_alert"]
ALL_CAUSES = sorted({c.value for c in Cause} | set(NEW_CAUSES))

AT = 1795247372.797  # 2026-11-21 07:49:32 UTC
FULL = HintContext(
    server="127.0.0.1:9002", scheme="http", at=AT,
    timeouts={"connect": 2.0, "response_header": 30.0, "idle_read": 60.0,
              "client_header": 10.0, "client_idle": 15.0},
    limits={"max_request_header_bytes": 16384, "max_response_header_bytes": 65536,
            "max_request_body_bytes": 1_000_000},
    p99_ms=41_000.0, details="something went wrong", pool="api", path="/v1/users",
    proxy_name="edge-1",
    reasons="127.0.0.1:9001 ejected: 3 failures in 10 s, last connection_refused, back in 4 s")
EMPTY = HintContext()

# Each cause's hint, with FULL, must show these real values.
EXPECTED: dict[str, list[str]] = {
    "connect_refused": ["127.0.0.1:9002", "`ss -tlnp`"],
    "connect_timeout": ["127.0.0.1:9002", "2 s", "timeouts.connect", "`nc -vz -w 3 127.0.0.1 9002`"],
    "destination_unroutable": ["127.0.0.1", "`ip route get 127.0.0.1`"],
    "local_connect_error": ["127.0.0.1:9002", "`ulimit -n`"],
    "connection_terminated": ["07:49:32 UTC", "OOM"],
    "write_timeout": ["127.0.0.1:9002", "60 s", "timeouts.idle_read"],
    "response_timeout": ["30 s", "timeouts.response_header", "41 s"],
    "upstream_protocol_error": ["127.0.0.1:9002", "http://127.0.0.1:9002/v1/users"],
    "response_headers_too_large": ["64 KiB", "limits.max_response_header_bytes",
                                   "http://127.0.0.1:9002/v1/users"],
    "response_transfer_coding": ["127.0.0.1:9002", "Content-Encoding: gzip"],
    "body_read_timeout": ["60 s", "timeouts.idle_read", "07:49:32 UTC"],
    "response_incomplete": ["07:49:32 UTC", "Content-Length"],
    "no_route": ["/v1/users", "[[routes]]"],
    "no_server_available": ["pool api", FULL.reasons],
    "connection_limit": ["pool api", "`max_connections`"],
    "loop_detected": ["Via already names edge-1", "`proxy_name`"],
    "configuration_error": ["/v1/users", "pool api"],
    "bad_request": ["details"],
    "request_headers_too_large": ["16 KiB", "limits.max_request_header_bytes"],
    "request_body_too_large": ["1000000 bytes", "limits.max_request_body_bytes"],
    "request_timeout": ["10 s", "timeouts.client_header", "15 s", "timeouts.client_idle"],
    "client_disconnected": ["41 s"],
    "proxy_internal": ["07:49:32 UTC", "request id"],
    "dns_error": ["127.0.0.1", "/etc/hosts", "resolv.conf", "`getent hosts 127.0.0.1`"],
    "dns_timeout": ["127.0.0.1", "/etc/hosts", "resolv.conf"],
    "tls_certificate": ["127.0.0.1:9002", "ca_file", "`sni`", "certificate chain",
                        "`tls_verify = false` is for testing only"],
    "tls_protocol": ["127.0.0.1:9002", "use http://127.0.0.1:9002"],
    "tls_alert": ["127.0.0.1:9002", "alert"],
}


def assert_clean(text: str | None) -> None:
    """Plain, one-paragraph text without leftovers of missing values or templates."""
    assert text, text
    assert "None" not in text and "{" not in text and "}" not in text, text
    assert "\n" not in text and "  " not in text and text == text.strip(), text
    assert "()" not in text and "``" not in text and "**" not in text, text
    assert text.count("`") % 2 == 0, text
    assert not re.search(r" [.,;:]", text), text
    assert text[-1] in ".?)", text


def test_expected_covers_every_cause() -> None:
    assert set(EXPECTED) == set(ALL_CAUSES)


def test_table_has_no_stale_keys() -> None:
    """Every key is a cause value, or "cause:variant" of one."""
    assert {key.partition(":")[0] for key in HINTS} == set(ALL_CAUSES)


@pytest.mark.parametrize("cause", ALL_CAUSES)
def test_every_cause_has_a_hint_with_real_values(cause: str) -> None:
    text = hint_for(cause, FULL)
    assert_clean(text)
    for value in EXPECTED[cause]:
        assert value in text, (value, text)


@pytest.mark.parametrize("cause", ALL_CAUSES)
def test_nothing_known_still_gives_a_clean_hint(cause: str) -> None:
    assert_clean(hint_for(cause, EMPTY))


FIELDS_OF_FULL = [f.name for f in dataclasses.fields(HintContext)]


@pytest.mark.parametrize("cause", ALL_CAUSES)
@pytest.mark.parametrize("missing", FIELDS_OF_FULL)
def test_any_one_value_missing_degrades_gracefully(cause: str, missing: str) -> None:
    empty = {} if missing in ("timeouts", "limits") else None
    ctx = dataclasses.replace(FULL, **{missing: empty})
    assert_clean(hint_for(cause, ctx))


@pytest.mark.parametrize("cause", ALL_CAUSES)
@pytest.mark.parametrize("key", TIMEOUT_KEYS + LIMIT_KEYS)
def test_one_timeout_or_limit_missing(cause: str, key: str) -> None:
    ctx = dataclasses.replace(FULL, timeouts={k: v for k, v in FULL.timeouts.items() if k != key},
                              limits={k: v for k, v in FULL.limits.items() if k != key})
    assert_clean(hint_for(cause, ctx))


# The three examples of issue 4, item 3.
def test_issue_example_connect_refused() -> None:
    text = hint_for("connect_refused", HintContext(server="127.0.0.1:9002"))
    assert text.startswith("Nothing is listening on 127.0.0.1:9002. Is the service running? "
                           "Is it listening on another port? (`ss -tlnp`)")


def test_issue_example_response_timeout() -> None:
    ctx = HintContext(server="127.0.0.1:9002", timeouts={"response_header": 30}, p99_ms=41_000)
    assert hint_for("response_timeout", ctx).startswith(
        "No response head within 30 s (timeouts.response_header). "
        "The upstream is slow or stuck; its p99 latency is 41 s")


def test_issue_example_connection_terminated() -> None:
    ctx = HintContext(server="127.0.0.1:9002", at=AT)
    assert hint_for("connection_terminated", ctx).startswith(
        "Upstream closed the connection before answering: it may have crashed or been "
        "killed (OOM?). Check its logs around 07:49:32 UTC")


def test_p99_clause_omitted_when_unknown() -> None:
    text = hint_for("response_timeout", HintContext(timeouts={"response_header": 30}))
    assert "p99" not in text
    assert "No response head within 30 s (timeouts.response_header). " \
           "The upstream is slow or stuck." in text


def test_fallbacks_are_sentences() -> None:
    assert hint_for("connect_refused", EMPTY).startswith(
        "Nothing is listening on the server's port. Is the service running?")
    assert hint_for("response_timeout", EMPTY).startswith(
        "No response head in time (timeouts.response_header). The upstream is slow or stuck.")
    assert "Check its logs for a crash" in hint_for("connection_terminated", EMPTY)


def test_cause_enum_members_work_too() -> None:
    assert hint_for(Cause.CONNECT_REFUSED, FULL) == hint_for("connect_refused", FULL)


@pytest.mark.parametrize("value", ["", "nope", "connection_refused", "tls_certificate_error",
                                   "connect_refused:dns", "tls_certificate:expired"])
def test_unknown_cause_has_no_hint(value: str) -> None:
    """Keys are Cause values, not RFC 9209 tokens; variants are chosen only by details."""
    assert hint_for(value, FULL) is None


# Variants chosen by the failure's details.
def test_tls_bytes_on_http_port_says_use_https() -> None:
    ctx = HintContext(server="127.0.0.1:9443", variant="tls",
                      details="response is a TLS record, not HTTP: upstream speaks TLS; use https://")
    text = hint_for("upstream_protocol_error", ctx)
    assert_clean(text)
    assert "use https://127.0.0.1:9443" in text
    assert "use https://" in hint_for("upstream_protocol_error", HintContext(variant="tls"))


def test_variant_comes_from_the_error_never_from_details() -> None:
    """Regression: the variant was chosen by matching details text, so an h11 parse error
    quoting an upstream's `Location https://x` line got the "use https://" advice."""
    ctx = HintContext(server="127.0.0.1:9000", details="invalid response: bad line b'Location https://x'")
    assert "use https://" not in hint_for("upstream_protocol_error", ctx)


def test_garbage_on_http_port_is_not_told_to_use_https() -> None:
    ctx = HintContext(server="127.0.0.1:9002", details="invalid response: Expected HTTP/")
    text = hint_for("upstream_protocol_error", ctx)
    assert "https://" not in text and "not valid HTTP/1.1" in text


def test_plain_http_on_https_port_says_use_http() -> None:
    ctx = HintContext(server="127.0.0.1:9002", scheme="https",
                      details="server speaks plain HTTP on an https:// port")
    assert "may speak plain HTTP on this port: use http://127.0.0.1:9002" in hint_for(
        "tls_protocol", ctx)
    assert "use http://" in hint_for("tls_protocol", EMPTY)


CERT_VARIANTS = [
    ("expired", "has expired"),
    ("self_signed", "is self-signed"),
    ("name", "does not name api.test"),
    ("unknown_ca", "does not trust"),
    (None, "was not accepted"),
    ("something-new", "was not accepted"),
]


@pytest.mark.parametrize(("variant", "says"), CERT_VARIANTS)
def test_certificate_hint_follows_the_variant(variant: str | None, says: str) -> None:
    ctx = HintContext(server="api.test:8443", scheme="https", variant=variant,
                      details="self-signed expired (details never pick the wording)")
    text = hint_for("tls_certificate", ctx)
    assert_clean(text)
    assert says in text
    for advice in ("certificate chain", "`ca_file`", "`sni`",
                   "`tls_verify = false` is for testing only",
                   "`openssl s_client -connect api.test:8443 -servername api.test`"):
        assert advice in text, advice
    assert_clean(hint_for("tls_certificate", HintContext(variant=variant)))


def test_unroutable_gets_routing_advice() -> None:
    """Names that do not resolve are dns_error now; unroutable is about routes only."""
    assert "ip route" in hint_for("destination_unroutable",
                                  HintContext(server="10.0.0.9:80", details="EHOSTUNREACH"))
    text = hint_for("dns_error", HintContext(server="backend.internal:8080"))
    assert "backend.internal" in text and "/etc/hosts" in text


def test_dns_hints_name_the_host() -> None:
    ctx = HintContext(host="backend.internal", port=8080)
    assert "The name backend.internal does not resolve" in hint_for("dns_error", ctx)
    assert "for backend.internal" in hint_for("dns_timeout", ctx)


# Values: derived, formatted, and junk ignored.
def test_host_and_port_derived_from_server_ipv6() -> None:
    text = hint_for("connect_timeout", HintContext(server="[::1]:9002"))
    assert "`nc -vz -w 3 ::1 9002`" in text and "[::1]:9002" in text


def test_server_derived_from_host_and_port() -> None:
    assert "Nothing is listening on 10.0.0.5:8080." in hint_for(
        "connect_refused", HintContext(host="10.0.0.5", port=8080))
    assert "Nothing is listening on [fe80::1]:8080." in hint_for(
        "connect_refused", HintContext(host="fe80::1", port=8080))


@pytest.mark.parametrize(("seconds", "text"), [
    (30, "30 s"), (30.0, "30 s"), (1.5, "1.5 s"), (41.25, "41.2 s"), (0.25, "250 ms"),
    (0.0015, "1.5 ms"), (120, "120 s"), (600.4, "600 s"),
])
def test_durations(seconds: float, text: str) -> None:
    ctx = HintContext(timeouts={"response_header": seconds})
    assert f"within {text} (timeouts.response_header)" in hint_for("response_timeout", ctx)


@pytest.mark.parametrize(("p99_ms", "text"), [(41_000, "41 s"), (850, "850 ms"), (2.5, "2.5 ms")])
def test_p99(p99_ms: float, text: str) -> None:
    assert f"its p99 latency is {text}." in hint_for("response_timeout", HintContext(p99_ms=p99_ms))


@pytest.mark.parametrize(("n", "text"), [(16384, "16 KiB"), (1 << 20, "1 MiB"), (100, "100 bytes"),
                                         (1500, "1500 bytes")])
def test_sizes(n: int, text: str) -> None:
    ctx = HintContext(limits={"max_request_body_bytes": n})
    assert f"over {text} (limits.max_request_body_bytes)" in hint_for("request_body_too_large", ctx)


def test_time_is_utc_whatever_the_local_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    import time
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        assert "around 00:00:05 UTC" in hint_for("connection_terminated", HintContext(at=5.0))
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


JUNK = [
    HintContext(server="", host="", path="", pool="", reasons="", details="", proxy_name=""),
    HintContext(server="not-an-address", p99_ms=float("nan"), at=float("inf")),
    HintContext(at=1e300, p99_ms=-5, port=True, timeouts={"connect": float("nan"),
                "response_header": -1, "idle_read": True, "client_header": "30"},
                limits={"max_request_body_bytes": "big", "max_request_header_bytes": None}),
    HintContext(server="127.0.0.1:9002", path="no-slash", scheme="",
                reasons="a\nb\r\nc  d.", details="multi\nline\x00 TLS"),
    HintContext(timeouts=None, limits=None),  # type: ignore[arg-type]
]


@pytest.mark.parametrize("cause", ALL_CAUSES)
@pytest.mark.parametrize("ctx", JUNK, ids=range(len(JUNK)))
def test_junk_values_never_render(cause: str, ctx: HintContext) -> None:
    assert_clean(hint_for(cause, ctx))


def test_junk_values_are_treated_as_missing() -> None:
    assert hint_for("connect_timeout", JUNK[2]).startswith("No connection in time")
    assert "within" not in hint_for("response_timeout", JUNK[2])
    assert "latency is" not in hint_for("response_timeout", JUNK[1])
    assert "no-slash" not in hint_for("no_route", JUNK[3])
    assert "is out: a b c d. Check" in hint_for("no_server_available", JUNK[3])
    assert "via already names gatewise" in hint_for("loop_detected", JUNK[0]).lower()


def test_hint_never_echoes_details() -> None:
    """details is shown next to the hint already; it only chooses the variant."""
    for cause in ALL_CAUSES:
        assert "something went wrong" not in hint_for(cause, FULL)
