"""The two builds of the picker's per-request modules (setup.py): compiled by mypyc, as `make install` and
`pip install` build them where a C compiler is found, and plain Python, as they install without one."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from extproc.build import compiled, stale_compiled_modules

ROOT = Path(__file__).resolve().parent.parent
# The unit tests of the per-request modules, which need no server.
UNIT_TESTS = (
    "tests/test_scheduler.py",
    "tests/test_parse.py",
    "tests/test_wire.py",
    "tests/test_batch_cost.py",
    "tests/test_metrics.py",
    "tests/test_sharing.py",
)


def test_the_build_is_the_one_asked_for() -> None:
    if os.environ.get("EXTPROC_PURE_PYTHON") == "1":
        assert not compiled()  # as the next test runs this one: the sources must be what runs
        return
    compiler = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        pytest.skip(f"no C compiler ({compiler}): the per-request modules are installed as plain Python")
    # With a compiler, a fall-back to plain Python (a mypyc error, say) must not pass unnoticed.
    assert compiled()


_ASKED_FOR = test_the_build_is_the_one_asked_for.__name__


def test_the_plain_python_build_passes_the_unit_tests() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{__file__}::{_ASKED_FOR}", *UNIT_TESTS],
        cwd=ROOT,
        env={**os.environ, "EXTPROC_PURE_PYTHON": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout


def test_a_source_newer_than_its_compiled_module_is_reported(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    now = time.time()
    for name in ("a", "sub/b"):
        for suffix, at in ((".py", now - 10), (".cpython-311-x86_64-linux-gnu.so", now)):
            (package / f"{name}{suffix}").write_bytes(b"")
            os.utime(package / f"{name}{suffix}", (at, at))
    assert stale_compiled_modules(package) == []
    os.utime(package / "sub/b.py", (now + 10, now + 10))
    assert stale_compiled_modules(package) == ["pkg/sub/b.py"]
