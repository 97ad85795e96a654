"""The cause taxonomy: one failure, one cause (STYLE §4).

Walks the proxy.errors.ProxyError tree: only leaves carry a cause, every cause but
PROXY_INTERNAL has exactly one leaf, and every RFC 9209 token we emit is a valid token.
"""

from __future__ import annotations

import re

import pytest

from diagnostics.causes import INFO, Cause
from diagnostics.classify import classify
from proxy.errors import ProxyError

# RFC 8941 §3.3.4, written out independently of diagnostics/proxy_status.py.
SF_TOKEN = re.compile(r"[A-Za-z*][!#$%&'*+\-.^_`|~0-9A-Za-z:/]*")


def all_subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(all_subclasses(sub))
    return found


CLASSES = all_subclasses(ProxyError)
LEAVES = [cls for cls in CLASSES if not cls.__subclasses__()]
INTERMEDIATE = [ProxyError] + [cls for cls in CLASSES if cls.__subclasses__()]


def test_tree_is_not_empty() -> None:
    assert LEAVES and len(INTERMEDIATE) > 1


@pytest.mark.parametrize("leaf", LEAVES, ids=lambda cls: cls.__name__)
def test_every_leaf_sets_its_own_cause(leaf: type) -> None:
    assert "cause" in vars(leaf)
    assert isinstance(vars(leaf)["cause"], Cause)


@pytest.mark.parametrize("cls", INTERMEDIATE, ids=lambda cls: cls.__name__)
def test_no_intermediate_class_sets_a_cause(cls: type) -> None:
    assert "cause" not in vars(cls)


def test_leaf_causes_plus_internal_cover_every_cause_once() -> None:
    causes = [leaf.cause for leaf in LEAVES]
    assert len(causes) == len(set(causes)), "two leaves share a cause"
    assert Cause.PROXY_INTERNAL not in causes, "PROXY_INTERNAL is for non-ProxyError bugs"
    assert set(causes) | {Cause.PROXY_INTERNAL} == set(Cause)


def test_no_stdlib_multiple_inheritance() -> None:
    """STYLE §4: a leaf that is also e.g. a TimeoutError makes isinstance chains lie."""
    for cls in CLASSES:
        for base in cls.__mro__:
            if base in (object, BaseException, Exception):
                continue
            assert issubclass(base, ProxyError), (cls, base)


@pytest.mark.parametrize("cause", list(Cause))
def test_every_info_token_is_an_sf_token(cause: Cause) -> None:
    assert SF_TOKEN.fullmatch(INFO[cause].token), INFO[cause].token


def test_info_has_a_row_per_cause() -> None:
    assert INFO.keys() == set(Cause)
    for info in INFO.values():
        assert 100 <= info.status <= 599
        assert info.summary


@pytest.mark.parametrize("leaf", LEAVES, ids=lambda cls: cls.__name__)
def test_classify_maps_each_leaf_to_its_cause(leaf: type) -> None:
    assert classify(leaf("detail", upstream="127.0.0.1:9001")) is leaf.cause


@pytest.mark.parametrize("exc", [ValueError(), RuntimeError("boom"), KeyError("k"),
                                 TimeoutError(), ConnectionRefusedError(), ProxyError("bare")])
def test_classify_anything_else_is_internal(exc: BaseException) -> None:
    assert classify(exc) is Cause.PROXY_INTERNAL


def test_retry_safe_matches_the_phase():
    """forward.py decides retries from INFO[cause].retry_safe: it must say exactly what
    the exception tree says (BeforeSend = nothing reached the upstream)."""
    from diagnostics.causes import INFO
    from proxy import errors

    def leaves(cls):
        subs = cls.__subclasses__()
        return [cls] if not subs else [leaf for s in subs for leaf in leaves(s)]

    for leaf in leaves(errors.ProxyError):
        assert INFO[leaf.cause].retry_safe is issubclass(leaf, errors.BeforeSend), leaf.__name__
