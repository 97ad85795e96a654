"""The hot path compiled with mypyc (setup.py): which modules, whether they are the ones
running, and plain Python on demand.

- MODULES: compiled by setup.py, in the order a request meets them. They must type-check
  (mypy): mypyc builds from their types.
- GATEWISE_PURE=1 in the environment: this process imports those modules from their
  .py files even where the extension is built (a debugger, a profiler that counts
  bytecodes, a test that patches a function called from compiled code).
- stale(): the modules whose source changed after the build. Python would go on loading
  the old extension, so the tests refuse to run on one (tests/conftest.py) and the
  `listening` log line says so.
- `mypyc_attr` comes from mypy_extensions, which the build has (mypy needs it) and a
  running gatewise may not: without it the decorator changes nothing, as for plain Python.
"""

from __future__ import annotations

import os
import sys
from importlib.abc import MetaPathFinder
from importlib.machinery import SOURCE_SUFFIXES, FileFinder, ModuleSpec, SourceFileLoader
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Callable, Sequence

try:
    from mypy_extensions import mypyc_attr
except ImportError:  # only mypyc reads it
    def mypyc_attr(*attrs: str, **options: Any) -> Callable[[Any], Any]:  # type: ignore[misc]
        return lambda cls: cls

MODULES = (
    "proxy.codec.base",
    "proxy.codec.llhttp",
    "proxy.downstream",
    "proxy.headers",
    "proxy.exchange",
    "proxy.forward",
    "proxy.router",
    "proxy.balancer",
    "proxy.pool",
    "proxy.upstream_conn",
    "proxy.flow",
    "proxy.servers",
    "proxy.stats",
    "proxy.runtime",
)
ROOT = Path(__file__).resolve().parent.parent


def source_paths() -> list[str]:
    """MODULES as paths relative to the project root (what setup.py hands to mypyc)."""
    return [name.replace(".", "/") + ".py" for name in MODULES]


class _SourceFirst(MetaPathFinder):
    """Finds MODULES as .py files only (GATEWISE_PURE)."""

    def find_spec(self, name: str, path: Sequence[str] | None = None,
                  target: Any = None) -> ModuleSpec | None:
        if name not in MODULES:
            return None
        for entry in path or ():
            spec = FileFinder(entry, (SourceFileLoader, SOURCE_SUFFIXES)).find_spec(name)
            if spec is not None:
                return spec
        return None


def pure_requested() -> bool:
    """GATEWISE_PURE set to anything but "" or "0"."""
    return os.environ.get("GATEWISE_PURE", "") not in ("", "0")


def built_extensions() -> list[Path]:
    """The compiled files in the tree: one per module, and the shared library at the root."""
    return ([p for package in ("proxy", "diagnostics") for p in (ROOT / package).rglob("*.so")]
            + sorted(ROOT.glob("*__mypyc*.so")))


def is_compiled() -> bool:
    """True when this process runs the compiled hot path."""
    from proxy import exchange
    return not exchange.__file__.endswith(".py")


def describe() -> str:
    """The hot path this process runs, for the `listening` log line and the test header."""
    if not is_compiled():
        return "plain Python"
    old = stale()
    return "compiled (mypyc)" + (f", older than its source: {' '.join(old)}" if old else "")


def stale() -> list[str]:
    """The compiled modules whose .py is newer than the extension that would be loaded
    for them, and extensions left from modules no longer in MODULES (empty when nothing
    is compiled, or under GATEWISE_PURE for MODULES)."""
    out = []
    for path in built_extensions():
        if path.parent == ROOT:
            continue  # the shared library: its modules are checked one by one
        relative = path.relative_to(ROOT)
        name = ".".join(relative.parent.parts + (path.name.split(".", 1)[0],))
        if name not in MODULES:
            out.append(f"{relative} (not compiled any more: delete it)")
    for name in MODULES:
        spec = find_spec(name)
        origin = spec.origin if spec is not None else None
        if origin is None or origin.endswith(".py"):
            continue
        source = ROOT / (name.replace(".", "/") + ".py")
        if source.stat().st_mtime > os.stat(origin).st_mtime:
            out.append(str(source.relative_to(ROOT)))
    return out


if pure_requested() and not any(isinstance(f, _SourceFirst) for f in sys.meta_path):
    sys.meta_path.insert(0, _SourceFirst())
