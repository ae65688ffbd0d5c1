"""Run Triton Inference Server from the ``nvidia-pytriton`` wheel.

The wheel ships ``pytriton/tritonserver/bin/tritonserver``, the python backend and one backend stub per
Python version. Triton wants them laid out as ``<backend-directory>/python/{libtriton_python.so,
triton_python_backend_utils.py,triton_python_backend_stub}``; :func:`prepare_backend_dir` builds that
layout out of symlinks, :func:`triton_env` the environment the server and its stubs need, and
:func:`triton_command` the command line.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import sysconfig
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

from extproc.admin_key import triton_flags

# Read by the emulated-hardware models in triton_models/ (e.g. timed_batch) in initialize().
SERVICE_TIME_FACTOR_ENV = "EXTPROC_SERVICE_TIME_FACTOR"

_BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")
_STUB = "triton_python_backend_stub"
# Each python-backend stub is started with the name of its shared-memory region (in /dev/shm) on its command
# line. Triton unlinks the regions when it stops, so a Triton killed or aborted leaves them behind.
_SHM_REGION_PREFIX = b"triton_python_backend_shm_region_"


class TritonNotInstalledError(RuntimeError):
    """The ``nvidia-pytriton`` wheel (Triton's binaries) is not installed in this environment."""


def _pytriton_root() -> Path:
    # find_spec, not import: importing pytriton pulls in its whole client stack.
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonNotInstalledError(
            "Triton Inference Server is not installed: install the runtime extra "
            "(pip install 'extproc[runtime]', which provides the nvidia-pytriton wheel)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def find_tritonserver() -> Path:
    """Path of the ``tritonserver`` binary shipped in the nvidia-pytriton wheel."""
    binary = _pytriton_root() / "tritonserver" / "bin" / "tritonserver"
    if not binary.is_file():
        raise TritonNotInstalledError(f"nvidia-pytriton is installed but {binary} is missing")
    return binary


def _libs_dir() -> Path:
    # auditwheel puts the server's shared libraries next to the package: site-packages/nvidia_pytriton.libs.
    return _pytriton_root().parent / "nvidia_pytriton.libs"


def _link(target: Path, link: Path) -> None:
    """Point ``link`` at ``target`` atomically (a temporary symlink renamed over ``link``).

    Idempotent, and safe when several processes prepare the same directory at once: each rename
    replaces the link with an identical one, and no process ever sees a half-made file.
    """
    if link.is_symlink() and link.resolve() == target.resolve():
        return
    tmp = link.with_name(f".{link.name}.{os.getpid()}.{uuid.uuid4().hex}")
    tmp.symlink_to(target)
    try:
        tmp.replace(link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def prepare_backend_dir(runtime_dir: Path) -> Path:
    """Build ``<runtime_dir>/backends/python/`` for the running Python and return ``<runtime_dir>/backends``.

    The returned directory is what ``--backend-directory`` takes.
    """
    root = _pytriton_root() / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / _STUB
    if not stub.is_file():
        raise TritonNotInstalledError(f"nvidia-pytriton has no python backend stub for Python {version}: {stub}")
    backends = runtime_dir.resolve() / "backends"
    python_dir = backends / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for name in _BACKEND_FILES:
        _link(root / "backends" / "python" / name, python_dir / name)
    _link(stub, python_dir / _STUB)
    return backends


def triton_env(service_time_factor: float) -> dict[str, str]:
    """The environment for ``tritonserver`` (inherited by its python backend stubs).

    - ``LD_LIBRARY_PATH``: the wheel's bundled libraries and the interpreter's ``LIBDIR`` (libpython),
      without which the stub fails to load.
    - ``PATH``: this interpreter's ``bin`` first. The stub embeds libpython, which finds its prefix by
      looking up ``python3`` on ``PATH``; with a virtual environment's ``bin`` first, the stub imports the
      venv's packages (numpy), not the base interpreter's.
    - ``EXTPROC_SERVICE_TIME_FACTOR``: read by the models that emulate a device's speed.
    """
    if not service_time_factor > 0:
        raise ValueError(f"service_time_factor must be above 0, got {service_time_factor}")
    env = dict(os.environ)
    libdirs = [str(_libs_dir())]
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        libdirs.append(str(libdir))
    if env.get("LD_LIBRARY_PATH"):
        libdirs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libdirs)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bindir, env["PATH"]]) if env.get("PATH") else bindir
    env[SERVICE_TIME_FACTOR_ENV] = repr(float(service_time_factor))
    return env


def triton_command(
    *,
    model_repository: Path,
    backend_dir: Path,
    http_port: int,
    grpc_port: int,
    metrics_port: int,
    models: Sequence[str],
    address: str = "127.0.0.1",
    metrics_interval_ms: int = 250,
    admin_key: str | None = None,
) -> list[str]:
    """The ``tritonserver`` command line: explicit model control, the given models only, on ``address``;
    with ``admin_key``, its control APIs answer only requests that carry the key (extproc/admin_key.py)."""
    if not models:
        raise ValueError("models must name at least one model")
    return [
        str(find_tritonserver()),
        f"--model-repository={model_repository.resolve()}",
        f"--backend-directory={backend_dir.resolve()}",
        "--model-control-mode=explicit",
        *(f"--load-model={name}" for name in models),
        # Not strict: strict readiness makes the whole server unready while any model unloads, so Envoy's
        # health checks would take every model's traffic off the host (and the picker's quarantine would
        # take the unload for a crash). The picker follows each model's readiness from the index instead.
        "--strict-readiness=false",
        "--exit-on-error=true",
        f"--http-address={address}",
        f"--http-port={http_port}",
        f"--grpc-address={address}",
        f"--grpc-port={grpc_port}",
        "--allow-metrics=true",
        f"--metrics-address={address}",
        f"--metrics-port={metrics_port}",
        f"--metrics-interval-ms={metrics_interval_ms}",
        "--log-info=true",
        "--log-warning=true",
        "--log-error=true",
        "--log-verbose=0",
        *(triton_flags(admin_key) if admin_key is not None else ()),
    ]


def stub_shm_regions(pids: Iterable[int]) -> list[Path]:
    """The shared-memory regions named on the command lines of ``pids`` (a Triton's python-backend stubs).

    Read them before the stubs are gone: nothing else names a dead Triton's regions."""
    regions = []
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        regions += [Path("/dev/shm", a.decode()) for a in argv if a.startswith(_SHM_REGION_PREFIX)]
    return regions
