"""Which build of the picker's per-request modules the tests run (see setup.py), and which tests may start
servers.

By default the compiled build, as installed: the suite refuses to start if a compiled module is older than
its source, since the old compiled code would be what runs. ``EXTPROC_PURE_PYTHON=1`` runs the plain Python
sources instead (see extproc/__init__.py), as an install without a C compiler does; tests/test_build.py runs
the unit tests so.

Unit and end-to-end tests: a test that starts a server (Envoy serving, Triton, ``extproc up``, Prometheus,
wrk) must be marked ``e2e``, so ``pytest -m "not e2e"`` runs the unit tests alone, fast, with no
ports or processes. The marker is checked, not trusted: while a test without it (and its fixtures) runs,
starting one of those programs fails the test.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from extproc.build import stale_compiled_modules
from tests.stack import E2E_GUARD, require_e2e

# Programs that serve once started; their one-shot uses are allowed anywhere.
_SERVERS = frozenset({"envoy", "tritonserver", "prometheus", "wrk"})
_ONE_SHOT_FLAGS = frozenset({"--version", "--help"})


def starts_a_server(argv: Sequence[str]) -> bool:
    """Whether ``argv`` starts a server (see the module's docstring); Envoy's ``--mode validate`` does not.
    ``extproc up`` is checked where the tests start it (:func:`tests.stack.start_stack`): with a config it
    refuses, it starts nothing."""
    if not argv:
        return False
    program = Path(argv[0]).name
    args = argv[1:]
    if program in _SERVERS:
        return not (_ONE_SHOT_FLAGS.intersection(args) or (program == "envoy" and "validate" in args))
    return False


def _guarded_popen_init(original: Any) -> Any:
    def init(self: subprocess.Popen[Any], args: Any, *rest: Any, **kwargs: Any) -> None:
        argv = [os.fsdecode(a) for a in ([args] if isinstance(args, (str, bytes, os.PathLike)) else args)]
        if not kwargs.get("shell") and starts_a_server(argv):
            require_e2e(argv[0])
        original(self, args, *rest, **kwargs)

    return init


def pytest_configure(config: pytest.Config) -> None:
    subprocess.Popen.__init__ = _guarded_popen_init(subprocess.Popen.__init__)  # type: ignore[method-assign]
    if os.environ.get("EXTPROC_PURE_PYTHON") == "1":
        return
    stale = stale_compiled_modules()
    if stale:
        pytest.exit(f"changed since they were compiled: {', '.join(stale)}; run `make install`", returncode=4)


def pytest_runtest_setup(item: pytest.Item) -> None:
    # Before the item's fixtures are set up: a module fixture that starts a stack counts for its first test.
    E2E_GUARD.e2e = item.get_closest_marker("e2e") is not None


def pytest_runtest_teardown(item: pytest.Item) -> None:
    E2E_GUARD.e2e = item.get_closest_marker("e2e") is not None
