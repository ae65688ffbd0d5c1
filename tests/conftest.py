"""Which build of the picker's per-request modules the tests run (see setup.py).

By default the compiled one, as installed: the suite refuses to start if a compiled module is older than its
source, since the old compiled code would be what runs. ``EXTPROC_PURE_PYTHON=1`` runs the plain Python
sources instead (see extproc/__init__.py), as an install without a C compiler does; tests/test_build.py runs
the unit tests so.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "extproc"


def stale_compiled_modules(package: Path = PACKAGE) -> list[str]:
    """The sources in ``package`` changed after they were compiled."""
    stale = []
    for compiled in package.rglob("*.so"):
        source = compiled.with_name(compiled.name.split(".", 1)[0] + ".py")
        if source.exists() and source.stat().st_mtime > compiled.stat().st_mtime:
            stale.append(str(source.relative_to(package.parent)))
    return sorted(stale)


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("EXTPROC_PURE_PYTHON") == "1":
        return
    stale = stale_compiled_modules()
    if stale:
        pytest.exit(f"changed since they were compiled: {', '.join(stale)}; run `make install`", returncode=4)
