"""``python -m benchmarks.sim``: see :mod:`benchmarks.sim.cli`."""

from __future__ import annotations

import contextlib
import sys

from benchmarks import quiet_logs
from benchmarks.sim.cli import main

if __name__ == "__main__":  # pragma: no cover
    quiet_logs()
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
