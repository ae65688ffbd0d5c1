"""Compiles the picker's per-request path, ``extproc/datapath``, with mypyc (the compiler that ships with
mypy): why, and what its modules must keep to, is in docs/development.md ("The compiled modules").
Everything else is in pyproject.toml.

Without a C compiler, or with ``EXTPROC_PURE_PYTHON=1``, the package installs as plain Python: same
behaviour, slower decisions (``extproc serve`` logs which one runs).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

# The per-request path, compiled whole: every module a routed request runs through, apart from the gRPC stream
# handlers (extproc/handlers: mypyc does not compile async generators).
COMPILED = sorted(str(path) for path in Path("extproc/datapath").rglob("*.py"))


class OptionalBuildExt(build_ext):
    """Installs the plain Python modules when the C build fails (no compiler, no Python headers)."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # a failed compile or link comes as one of several unrelated types
            # A module built before the failure would import without the shared library it needs.
            for ext in self.extensions:
                Path(self.get_ext_fullpath(ext.name)).unlink(missing_ok=True)
            print(f"extproc: the mypyc build failed ({exc}); installing plain Python", file=sys.stderr)


def _ext_modules() -> list[object]:
    if os.environ.get("EXTPROC_PURE_PYTHON") == "1":
        return []
    from mypyc.build import mypycify

    # The build environment has mypy but not the runtime dependencies (pydantic, structlog, ...): their
    # types are Any here, which costs these modules nothing (they only pass those objects along).
    # `make lint` type-checks the package strictly, with them.
    flags = ["--config-file=", "--ignore-missing-imports", "--python-version=3.11"]
    return list(mypycify([*flags, *COMPILED], opt_level="3"))


setup(ext_modules=_ext_modules(), cmdclass={"build_ext": OptionalBuildExt})
