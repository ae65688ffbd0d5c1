"""The fleet's admin key: the secret that Triton's control APIs ask for on the hosts ``extproc up`` launches.

Those hosts restrict the model repository (load, unload, index), shared memory, logging and trace APIs
to requests that carry the key: the REST header ``extproc-admin-key``, the gRPC metadata
``triton-grpc-protocol-extproc-admin-key`` (Triton prefixes the header of a restricted gRPC protocol).
Only the fleet's own tooling sends it: the picker's repository poll and ``extproc models``. Statistics,
model config, health and inference stay unrestricted.

The key comes from the fleet file's ``admin_key_file``; without one, ``extproc up`` generates a key into
``<runtime_dir>/admin.key`` (owner-only) on first start and reuses it afterwards, and the tools read it
from there. Without either, the tools send no key (Triton hosts run by the operator without restriction).
Triton hosts that the operator runs need the options of :func:`triton_flags`, with the same key.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from typing import Final

from extproc.config import ConfigError, Fleet
from extproc.datapath.headers import ADMIN_KEY_GRPC_HEADER, ADMIN_KEY_HEADER

HEADER: Final = ADMIN_KEY_HEADER
GRPC_HEADER: Final = ADMIN_KEY_GRPC_HEADER
# Triton's names for its API groups; ModelStatistics and ModelConfig are outside them.
RESTRICTED_APIS: Final = ("model-repository", "shared-memory", "logging", "trace")

# Visible ASCII only: the key travels as an HTTP header and as ASCII gRPC metadata. The minimum length
# refuses a placeholder left in a key file.
_KEY = re.compile(r"[\x21-\x7e]{16,4096}")


def generated_key_file(runtime_dir: str | Path) -> Path:
    """Where ``extproc up`` keeps the key it generated for a fleet without ``admin_key_file``."""
    return Path(runtime_dir) / "admin.key"


def read_admin_key(fleet: Fleet) -> str | None:
    """The fleet's admin key, or None where there is none (no header is sent). Raises :class:`ConfigError`
    naming the file when ``admin_key_file`` (or the generated key) cannot be read or holds no valid key."""
    if fleet.admin_key_file is not None:
        return read_secret_file(Path(fleet.admin_key_file), f"{fleet.source}: key admin_key_file")
    path = generated_key_file(fleet.runtime_dir)
    if not path.exists():
        return None
    return read_secret_file(path, f"{fleet.source}: the key extproc up generated (runtime_dir)")


def ensure_admin_key(fleet: Fleet) -> str:
    """The fleet's admin key for the hosts ``extproc up`` launches, generated on first start when the fleet
    file names no ``admin_key_file``. ``runtime_dir`` must exist."""
    key = read_admin_key(fleet)
    if key is not None:
        return key
    key = secrets.token_urlsafe(32)
    # Created owner-only (O_EXCL: never through a file or link someone placed there), whatever the umask.
    fd = os.open(generated_key_file(fleet.runtime_dir), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as out:
        out.write(key + "\n")
    return key


def triton_flags(key: str) -> list[str]:
    """The ``tritonserver`` options that restrict its control APIs to requests carrying ``key``."""
    apis = ",".join(RESTRICTED_APIS)
    return [
        f"--http-restricted-api={apis}:{HEADER}={key}",
        # Triton adds the triton-grpc-protocol- prefix to this header on gRPC (GRPC_HEADER).
        f"--grpc-restricted-protocol={apis}:{HEADER}={key}",
    ]


def read_secret_file(path: Path, what: str, noun: str = "key") -> str:
    """The secret a file holds (the admin key, the picker's control token), stripped; raises
    :class:`ConfigError` starting with ``what`` (the file's key in the fleet file) on a file that cannot be
    read or does not hold one ``noun`` of 16 to 4096 visible ASCII characters."""
    try:
        secret = path.read_text(encoding="ascii").strip()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what}: {path} is not ASCII text") from None
    if not secret:
        raise ConfigError(f"{what}: {path} is empty")
    # The message never shows the secret, only what is wrong with it.
    if not _KEY.fullmatch(secret):
        raise ConfigError(
            f"{what}: {path} must hold one {noun} of 16 to 4096 visible ASCII characters (no spaces), "
            f"got {len(secret)} characters"
        )
    return secret
