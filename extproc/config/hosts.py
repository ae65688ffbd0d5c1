"""The Triton hosts: listed one by one (``hosts``, by IP address) or discovered by DNS (``pools``), and the
addresses the fleet file gives them and its DNS servers."""

from __future__ import annotations

import ipaddress
import re
from typing import Self

from pydantic import Field, field_validator, model_validator

from extproc.config.common import Port, Strict, Tier

__all__ = ["HostSpec", "LaunchSpec", "PoolSpec", "endpoint", "is_ip", "resolver_address"]


class LaunchSpec(Strict):
    """How ``extproc up`` starts this host locally; absent for Triton hosts that run elsewhere."""

    models: tuple[str, ...] = Field(min_length=1)
    # Multiplies the service time of models that emulate hardware speed (see triton_models/).
    service_time_factor: float = Field(default=1.0, gt=0, le=100)
    # Restart the host when it exits (with backoff; left down after repeated crashes). Off: a crash is
    # only reported, e.g. to keep a crashed host's state for a post-mortem.
    restart: bool = True


class _Ports(Strict):
    """What a static host and a pool's hosts have in common: their tier, ports and labels."""

    http_port: Port = 8000
    grpc_port: Port = 8001
    metrics_port: Port = 8002
    tier: Tier
    labels: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _distinct_ports(self) -> Self:
        if len(set(self.ports)) != 3:
            raise ValueError(f"http_port, grpc_port and metrics_port must differ, got {self.ports}")
        return self

    @property
    def ports(self) -> tuple[int, int, int]:
        return self.http_port, self.grpc_port, self.metrics_port


class HostSpec(_Ports):
    name: str = Field(pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
    address: str
    launch: LaunchSpec | None = None

    @field_validator("address")
    @classmethod
    def _ip_literal(cls, value: str) -> str:
        # Envoy's override_host matches the header against the cluster members' resolved addresses, so the
        # picker must name hosts exactly as Envoy sees them: an IP literal. DNS names go in ``pools``.
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address (for a DNS name, use pools)") from None

    @property
    def http_endpoint(self) -> str:
        return endpoint(self.address, self.http_port)

    @property
    def grpc_endpoint(self) -> str:
        return endpoint(self.address, self.grpc_port)

    @property
    def metrics_url(self) -> str:
        return f"http://{endpoint(self.address, self.metrics_port)}/metrics"


# A DNS name: dot-separated labels of letters, digits, '-' and '_' (SRV-style names), at most 253 characters;
# a trailing dot makes it absolute (no search domains).
_LABEL = r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_DNS_NAME = re.compile(rf"^(?=.{{1,253}}\.?$){_LABEL}(\.{_LABEL})*\.?$")


class PoolSpec(_Ports):
    """Hosts discovered by DNS: every A record of ``dns`` is a host of ``tier`` with these ports and labels,
    named ``<name>-<address with dashes>`` (e.g. ``gpu-10-0-0-7``). Envoy and the picker both re-resolve the
    name every ``refresh_s``: a Kubernetes headless Service's name gives its ready pods."""

    # Short enough that the longest host name (``-255-255-255-255`` appended) is still a valid host name.
    name: str = Field(pattern=r"^[a-z0-9]([a-z0-9-]{0,45}[a-z0-9])?$")
    dns: str
    refresh_s: float = Field(default=5.0, ge=0.1, le=3600)

    @field_validator("dns")
    @classmethod
    def _dns_name(cls, value: str) -> str:
        if is_ip(value):
            raise ValueError(f"{value!r} is an IP address: list it under hosts")
        if not _DNS_NAME.match(value) or value.replace(".", "").isdigit():
            raise ValueError(f"{value!r} is not a DNS name")
        return value

    def host(self, address: str) -> HostSpec:
        """The host of one A record."""
        return HostSpec(
            name=f"{self.name}-{address.replace('.', '-')}",
            address=address,
            http_port=self.http_port,
            grpc_port=self.grpc_port,
            metrics_port=self.metrics_port,
            tier=self.tier,
            labels=self.labels,
        )

    def named(self, host: str) -> bool:
        """Whether ``host`` has the form of a name this pool gives its hosts."""
        return re.fullmatch(rf"{re.escape(self.name)}(-\d{{1,3}}){{4}}", host) is not None


def is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def endpoint(address: str, port: int) -> str:
    """``address:port``, with an IPv6 address in brackets."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def resolver_address(value: str) -> tuple[str, int]:
    """``ip``, ``ip:port`` or ``[ipv6]:port`` of a DNS server → (ip, port); port 53 when not given."""
    host, port = value, "53"
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
        if not sep:
            host, port = host.removesuffix("]"), "53"
    elif value.count(":") == 1:
        host, port = value.split(":")
    if not is_ip(host) or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not IP[:PORT]")
    return str(ipaddress.ip_address(host)), int(port)
