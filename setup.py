"""Compiles the picker's per-request modules with mypyc (the compiler that ships with mypy), which runs
them as C: the scheduler's decision takes half the instructions of the same code interpreted (README,
"Performance"). Everything else in pyproject.toml.

Without a C compiler, or with ``EXTPROC_PURE_PYTHON=1``, the package installs as plain Python: same
behaviour, slower decisions (``extproc serve`` logs which one runs). The modules below must stay plain,
fully typed Python that mypyc accepts: no async generators, no monkeypatching, class constants as
``ClassVar``, no frozen dataclass that is pickled. To stay fast compiled: module constants ``Final`` (others
are looked up in the module's dictionary at each use), and a written ``__init__`` (``init=False``) for a
dataclass made per request (the generated one stays interpreted: 2k instructions a call against 0.4k).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

# Every module a routed request runs through, apart from the gRPC stream itself (handlers/server.py: mypyc
# does not compile async generators).
COMPILED = [
    "extproc/batch_cost.py",
    "extproc/datastore.py",
    "extproc/handlers/grpc_body.py",
    "extproc/handlers/head_scanner.py",
    "extproc/handlers/json_text.py",
    "extproc/handlers/parse.py",
    "extproc/handlers/request.py",
    "extproc/handlers/response.py",
    "extproc/handlers/tensor_checks.py",
    "extproc/handlers/tensor_data.py",
    "extproc/handlers/tensors.py",
    "extproc/handlers/wire.py",
    "extproc/headers.py",
    "extproc/metrics.py",
    "extproc/scheduling/admission.py",
    "extproc/scheduling/affinity.py",
    "extproc/scheduling/classify.py",
    "extproc/scheduling/fairness.py",
    "extproc/scheduling/filters.py",
    "extproc/scheduling/pickers.py",
    "extproc/scheduling/quarantine.py",
    "extproc/scheduling/registry.py",
    "extproc/scheduling/scheduler.py",
    "extproc/scheduling/scorers.py",
    "extproc/scheduling/sequences.py",
    "extproc/scheduling/types.py",
]


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
