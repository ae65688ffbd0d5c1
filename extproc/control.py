"""The picker's control token: the bearer token that the HTTP endpoint's state-changing calls (``POST
/hosts/NAME/drain`` and ``/undrain``) require, so that the endpoint can listen beyond loopback (Prometheus
and probes reach the pod IP in Kubernetes) without letting whoever reaches the port take hosts out of
routing.

- ``picker.control_token_file`` names a file holding the token (in Kubernetes, a Secret mounted read-only).
  When it is set, every state-changing call needs ``Authorization: Bearer <token>``, on loopback too.
- Without it, the fleet file is invalid when ``picker.metrics_address`` is beyond loopback (see
  :class:`extproc.config.PickerSpec`), and the calls are open on loopback, as before.
- The picker reads the file when it starts (a missing or malformed file refuses the start) and again on
  each state-changing call, which are rare: a rotated Secret applies without a restart. ``extproc models``
  reads it when it starts and sends the token.

Reads (``/metrics``, ``/ready``, ``/status``) stay open: they change nothing, and Prometheus and the
kubelet's probes read them.
"""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Final

from extproc.admin_key import read_secret_file
from extproc.config import Fleet

__all__ = ["AUTHORIZATION", "SCHEME", "authorized", "read_control_token"]

AUTHORIZATION: Final = "Authorization"
SCHEME: Final = "Bearer"


def read_control_token(fleet: Fleet) -> str | None:
    """The token ``picker.control_token_file`` holds, or None where the fleet file names none. Raises
    :class:`ConfigError` naming the file, the key and the problem."""
    name = fleet.picker.control_token_file
    if name is None:
        return None
    return read_secret_file(Path(name), f"{fleet.source}: key picker.control_token_file", "token")


def authorized(header: str | None, token: str) -> bool:
    """Whether an ``Authorization`` header value carries ``token`` (compared in constant time)."""
    scheme, _, given = (header or "").partition(" ")
    if scheme.lower() != SCHEME.lower():
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())
