"""Which build of the picker's per-request modules runs: compiled by mypyc (see setup.py) or plain Python."""

from __future__ import annotations

from pathlib import Path
from typing import Final

from extproc.datapath.scheduling import scheduler

PACKAGE: Final = Path(__file__).resolve().parent


def stale_compiled_modules(package: Path = PACKAGE) -> list[str]:
    """The sources in ``package`` changed after they were compiled (``make install`` builds them again)."""
    stale = []
    for built in package.rglob("*.so"):
        source = built.with_name(built.name.split(".", 1)[0] + ".py")
        if source.exists() and source.stat().st_mtime > built.stat().st_mtime:
            stale.append(str(source.relative_to(package.parent)))
    return sorted(stale)


def compiled() -> bool:
    """Whether the per-request modules run compiled; setup.py builds them together, all or none, so the
    scheduler's module tells for them all."""
    return Path(scheduler.__file__ or "").suffix != ".py"
