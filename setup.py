"""Builds gatewise: the modules every forwarded request runs through are compiled with
mypyc (from mypy) into a C extension; everything else stays plain Python.

Why: on the hot path CPython spends most of its time dispatching bytecodes and looking
attributes up, not doing the proxy's work (benchmarks/README.md: "The compiled hot
path"). mypyc turns the same Python source, checked by mypy, into C: typed attributes
become struct fields and calls between these modules direct C calls. The source stays
the one truth: it runs as is wherever the extension is not built.

Pure Python instead, with the same behaviour (compiled code also checks annotated types
at run time):
- GATEWISE_PURE=1 when installing;
- no C compiler on the machine (the build says so, then goes on without it);
- GATEWISE_PURE=1 when running: the extension is present but not loaded (proxy/compiled.py,
  which lists the compiled modules).
A type error in a compiled module fails the build: mypyc compiles from those types.
"""

from __future__ import annotations

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from proxy.compiled import built_extensions, pure_requested, source_paths  # noqa: E402


def remove_built() -> None:
    """An earlier build's extensions would go on loading (Python prefers them to the .py),
    whatever this build does: every build starts without them."""
    for path in built_extensions():
        path.unlink()


class OptionalBuildExt(build_ext):
    """No C compiler is not an error: gatewise then runs as plain Python."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # distutils' CompileError, PlatformError...
            remove_built()  # (whatever part of the build got copied into the tree)
            print(f"gatewise: could not compile the hot path ({exc}); installing plain Python",
                  file=sys.stderr)


def ext_modules() -> list:
    remove_built()
    if pure_requested():
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:  # (pyproject.toml's build requirements include mypy)
        print("gatewise: mypyc not found; installing plain Python", file=sys.stderr)
        return []
    return mypycify(source_paths(), opt_level="3")


setup(ext_modules=ext_modules(), cmdclass={"build_ext": OptionalBuildExt})
