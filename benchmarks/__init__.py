"""extproc's benchmarks: programs that start the picker (or parts of it) and print numbers.

They live outside the ``extproc`` package, which never imports them, and are not installed with it: run each
from the repository root with the project's environment, ``.venv/bin/python -m benchmarks.NAME --help``:

- ``decision``: the picker's in-process decision time over synthetic fleets;
- ``instructions``: the request path in instructions per request (valgrind);
- ``overhead``: what the picker costs a request, against plain Envoy and a bare ext_proc processor;
- ``routing``: the picker against Envoy's own load balancers on a real fleet (``scenarios/*.yaml``);
- ``capacity``: each policy's capacity at a p99 SLO (the highest rate within it), on ``routing``'s scenarios;
- ``gateways``: a ``routing`` scenario through one gateway and through several, their pickers sharing their
  loads or not;
- ``overload``: demand above capacity, admission control off and on, on a real fleet (``scenarios/overload/``);
- ``plot``: a latency-CDF PNG from a JSON file of latencies;
- ``compare_revisions``: the overhead benchmark of two worktrees, alternately;
- ``sim``: a discrete-event fleet simulation in which the real scheduler decides (``scenarios/sim/*.yaml``);
- ``fleet``: the picker's telemetry cost over up to 1,000 emulated Triton hosts (and real ones beside them);
- ``placement``: the placement controller off and on over a demand shift on a real fleet, and ``--steady``
  for flapping (``scenarios/placement/``).

Results go to ``results/`` by default; the ones the docs quote are committed there. The tests import these
modules, but never assert a timing.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any, Final

PACKAGE_DIR: Final = Path(__file__).resolve().parent
REPO_ROOT: Final = PACKAGE_DIR.parent
RESULTS_DIR: Final = PACKAGE_DIR / "results"
SCENARIOS_DIR: Final = PACKAGE_DIR / "scenarios"


def shown(path: Path) -> str:
    """``path`` as a help text shows it: relative to the repository root when under it."""
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def child_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a ``python -m benchmarks.…`` child process: ``base`` (default: this process's)
    with the repository root first on ``PYTHONPATH``, since the package is not installed and the child's
    working directory need not be the repository root."""
    env = dict(os.environ if base is None else base)
    parts = [str(REPO_ROOT), *(p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p)]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    return env


def stop_process(process: subprocess.Popen[Any], timeout_s: float) -> None:
    """SIGTERM ``process`` if it runs, and SIGKILL it if it has not exited ``timeout_s`` later."""
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def quiet_logs() -> None:
    """For a benchmark run as a program: the picker's own log lines (structlog, on stderr) from warning up."""
    from extproc.logs import configure

    configure("warning", "auto")


def revision() -> str:
    """The commit measured, with "+changes" when the working tree's tracked files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")
