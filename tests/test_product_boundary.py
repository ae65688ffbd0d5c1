"""The product boundary: the ``extproc`` package (what is installed and runs in production) holds no benchmark
code and never imports the top-level ``benchmarks`` package, and its command line has no ``bench`` command."""

from __future__ import annotations

import argparse
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from extproc.cli import _parser, main

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "extproc"


def benchmark_references(path: Path) -> list[str]:
    """Imports of ``benchmarks`` (or a module of it) in ``path``, and strings naming one (``-m benchmarks.x``),
    as ``LINE: NAME``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names = [node.value] if re.fullmatch(r"benchmarks(\.\w+)*", node.value) else []
        line = getattr(node, "lineno", 0)
        found += [f"{line}: {name}" for name in names if name.split(".")[0] == "benchmarks"]
    return found


def test_no_module_of_extproc_imports_the_benchmarks() -> None:
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 20  # the walk found the package
    found = [f"{path.relative_to(REPO)}:{ref}" for path in modules for ref in benchmark_references(path)]
    assert found == []


def test_the_check_sees_each_way_of_naming_the_benchmarks(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        "import benchmarks\nfrom benchmarks.overhead import main\nimport benchmarks.decision as d\n"
        "ARGV = ['python', '-m', 'benchmarks.routing']\nfrom extproc import benchmarks_x\nDOC = 'the benchmarks'\n",
        encoding="utf-8",
    )
    assert benchmark_references(module) == [
        "1: benchmarks",
        "2: benchmarks.overhead",
        "3: benchmarks.decision",
        "4: benchmarks.routing",
    ]


def test_the_package_has_no_benchmark_modules() -> None:
    assert not (PACKAGE / "bench").exists()
    # Nothing of them compiled: no path or module name (a string without spaces) in setup.py names a benchmark.
    setup = ast.parse((REPO / "setup.py").read_text(encoding="utf-8"))
    strings = [n.value for n in ast.walk(setup) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    assert [s for s in strings if "bench" in s and not re.search(r"\s", s)] == []
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    # Only extproc and its sub-packages go into the wheel.
    assert re.search(r'\[tool\.setuptools\.packages\.find\]\s*include = \["extproc\*"\]', pyproject)


def test_the_command_line_has_no_bench_command(capsys: pytest.CaptureFixture[str]) -> None:
    (commands,) = [a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert "bench" not in commands.choices
    assert {"up", "serve", "check", "envoy-config", "models", "status"} <= set(commands.choices)
    with pytest.raises(SystemExit) as stopped:
        main(["bench", "decision"])
    assert stopped.value.code == 2
    assert "invalid choice: 'bench'" in capsys.readouterr().err


def test_importing_the_product_loads_no_benchmark_module() -> None:
    code = (
        "import sys, extproc.cli, extproc.app, extproc.runtime.stack, extproc.ops.status\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'benchmarks'))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
