"""extproc: an ML-aware load balancer for NVIDIA Triton fleets (an Envoy ext_proc picker).

``EXTPROC_PURE_PYTHON=1`` runs the plain Python sources of the modules that ``setup.py`` compiles with mypyc,
even where the compiled ones are installed: the same behaviour, slower (for comparisons, and a way out
without reinstalling should a compiled module ever misbehave).
"""

from __future__ import annotations

import os


def _import_sources() -> None:
    import importlib.machinery as machinery
    import sys
    from importlib.abc import PathEntryFinder
    from pathlib import Path

    package = Path(__file__).resolve().parent
    source_only = machinery.FileFinder.path_hook((machinery.SourceFileLoader, machinery.SOURCE_SUFFIXES))

    def hook(path: str) -> PathEntryFinder:
        if Path(path).resolve().is_relative_to(package):
            return source_only(path)
        raise ImportError  # not ours: the next hook finds it as usual

    sys.path_hooks.insert(0, hook)
    sys.path_importer_cache.clear()


if os.environ.get("EXTPROC_PURE_PYTHON") == "1":
    _import_sources()

# extproc's processes (and its tests and benchmarks) start children with a pre-exec function (their death
# signal) after gRPC is running in the parent. With gRPC's fork support on, its after-fork handler restarts
# gRPC's pollers in the child before exec, and closing the inherited descriptors then makes them abort the
# child ("Epoll1Poller ... epoll_wait error: Bad file descriptor", exit -6: an Envoy that never starts).
# Nothing here uses gRPC across a fork. Read by gRPC when it first starts, so set before that.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
