"""Which build of the picker's per-request modules the tests run (see setup.py).

By default the compiled one, as installed: the suite refuses to start if a compiled module is older than its
source, since the old compiled code would be what runs. ``EXTPROC_PURE_PYTHON=1`` runs the plain Python
sources instead, as an install without a C compiler does (tests/test_build.py runs the unit tests so).
"""

from __future__ import annotations

import importlib.machinery as machinery
import os
import sys
from importlib.abc import PathEntryFinder
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "extproc"


def _source_only_imports() -> None:
    """Import extproc's modules from their .py files even where a compiled module sits beside them."""
    source_only = machinery.FileFinder.path_hook((machinery.SourceFileLoader, machinery.SOURCE_SUFFIXES))

    def hook(path: str) -> PathEntryFinder:
        if Path(path).resolve().is_relative_to(PACKAGE):
            return source_only(path)
        raise ImportError  # not ours: the next hook finds it as usual

    sys.path_hooks.insert(0, hook)
    sys.path_importer_cache.clear()


def stale_compiled_modules(package: Path = PACKAGE) -> list[str]:
    """The sources in ``package`` changed after they were compiled."""
    stale = []
    for compiled in package.rglob("*.so"):
        source = compiled.with_name(compiled.name.split(".", 1)[0] + ".py")
        if source.exists() and source.stat().st_mtime > compiled.stat().st_mtime:
            stale.append(str(source.relative_to(package.parent)))
    return sorted(stale)


if os.environ.get("EXTPROC_PURE_PYTHON") == "1":
    if "extproc" in sys.modules:
        raise RuntimeError("extproc was imported before tests/conftest.py could make it plain Python")
    _source_only_imports()


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("EXTPROC_PURE_PYTHON") == "1":
        return
    stale = stale_compiled_modules()
    if stale:
        pytest.exit(f"changed since they were compiled: {', '.join(stale)}; run `make install`", returncode=4)
