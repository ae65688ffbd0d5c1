"""Which build of the picker's per-request modules runs: compiled by mypyc (see setup.py) or plain Python."""

from __future__ import annotations

from pathlib import Path

from extproc.datapath.scheduling import scheduler


def compiled() -> bool:
    """Whether the per-request modules run compiled; setup.py builds them together, all or none, so the
    scheduler's module tells for them all."""
    return Path(scheduler.__file__ or "").suffix != ".py"
