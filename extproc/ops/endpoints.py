"""The picker and Envoy endpoints an operation acts through, as ``--picker`` and ``--envoy`` name them.

A URL names one endpoint. ``dns+http://NAME:PORT`` (or ``dns+https://``) names every address that NAME
resolves to, each as ``http://ADDRESS:PORT``: in Kubernetes, a headless Service, whose name resolves to one
address per ready pod. An operation that drains hosts must reach every picker and every Envoy that may
route to them, and replicas come and go; the placement controller resolves the names again each round.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

from extproc.ops import OpsError

__all__ = ["DNS_PREFIX", "Resolver", "expand", "system_resolver"]

DNS_PREFIX = "dns+"

# A name and port → the addresses the name resolves to (raising OSError when it does not).
Resolver = Callable[[str, int], Sequence[str]]


def system_resolver(name: str, port: int) -> list[str]:
    """Every address ``name`` resolves to, as the system's resolver answers (A and AAAA records)."""
    infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def _url(scheme: str, address: str, port: int, path: str) -> str:
    host = f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
    return f"{scheme}://{host}:{port}{path}"


def expand(urls: Sequence[str], resolve: Resolver = system_resolver) -> list[str]:
    """``urls`` with each ``dns+`` entry replaced by one URL per address its name resolves to (sorted, no
    duplicates). A name that resolves to nothing is an error: an operation acting through part of the
    fleet's pickers or Envoys could unload a host that some of them still route to."""
    expanded: list[str] = []
    for url in urls:
        if not url.startswith(DNS_PREFIX):
            expanded.append(url)
            continue
        parts = urlsplit(url[len(DNS_PREFIX) :])
        if parts.scheme not in {"http", "https"} or not parts.hostname or parts.port is None:
            raise OpsError(f"{url}: expected dns+http://NAME:PORT or dns+https://NAME:PORT")
        try:
            addresses = sorted(set(resolve(parts.hostname, parts.port)))
        except OSError as exc:
            raise OpsError(f"{url}: {parts.hostname} does not resolve ({exc})") from exc
        if not addresses:
            raise OpsError(f"{url}: {parts.hostname} resolves to no address")
        expanded += [_url(parts.scheme, a, parts.port, parts.path) for a in addresses]
    return list(dict.fromkeys(expanded))
