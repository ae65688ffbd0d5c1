"""``python -m benchmarks.overhead``: see :mod:`benchmarks.overhead`."""

import contextlib
import sys

from benchmarks import quiet_logs
from benchmarks.overhead.cli import main

if __name__ == "__main__":  # pragma: no cover
    quiet_logs()
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
