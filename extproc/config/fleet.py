"""The whole fleet file, and the checks that span its sections (unique names, shared ports, references)."""

from __future__ import annotations

from typing import Self

from pydantic import Field, field_validator, model_validator

from extproc.config.common import Strict, Tier
from extproc.config.envoy import EnvoySpec
from extproc.config.hosts import HostSpec, PoolSpec, endpoint, resolver_address
from extproc.config.models import ModelSpec, Profile
from extproc.config.picker import PickerSpec
from extproc.config.placement import PlacementSpec, check_placement

__all__ = ["Fleet"]


class Fleet(Strict):
    """The whole fleet file. ``source`` is the file it came from, for messages."""

    hosts: tuple[HostSpec, ...] = ()
    # Hosts discovered by DNS, re-resolved while running (see PoolSpec).
    pools: tuple[PoolSpec, ...] = ()
    # ``ip[:port]`` of the DNS servers that Envoy and the picker ask for the pools' names; absent: the
    # system's resolver (/etc/resolv.conf, with its search domains).
    dns_resolvers: tuple[str, ...] | None = Field(default=None, min_length=1)
    models: tuple[ModelSpec, ...] = ()
    picker: PickerSpec = PickerSpec()
    envoy: EnvoySpec = EnvoySpec()
    # Demand-driven model placement (off by default; see extproc/config/placement.py).
    placement: PlacementSpec = PlacementSpec()
    # Where ``extproc up`` finds the model repository for hosts it launches, and keeps run-time files.
    model_repository: str = "triton_models"
    runtime_dir: str = ".run"
    # A file holding the key that Triton's control APIs (model repository, shared memory, logging, trace)
    # require; null: ``extproc up`` generates one into <runtime_dir>/admin.key. Read when a command starts,
    # not here, so that rendering Envoy's config needs no secret (see extproc/admin_key.py).
    admin_key_file: str | None = Field(default=None, min_length=1)
    source: str = Field(default="<memory>", exclude=True)

    @field_validator("dns_resolvers")
    @classmethod
    def _resolvers(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return None if value is None else tuple(endpoint(*resolver_address(r)) for r in value)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if not self.hosts and not self.pools:
            raise ValueError("the fleet has neither hosts nor pools")
        _unique("hosts", [h.name for h in self.hosts])
        _check_pools(self.pools, self.hosts)
        _unique("models", [m.name for m in self.models])
        seen: dict[tuple[str, int], str] = {}
        for host in self.hosts:
            for port in host.ports:
                other = seen.setdefault((host.address, port), host.name)
                if other != host.name:
                    raise ValueError(f"hosts {other!r} and {host.name!r} both use {host.address}:{port}")
        if self.picker.nvml_host is not None and self.picker.nvml_host not in {h.name for h in self.hosts}:
            raise ValueError(f"picker.nvml_host {self.picker.nvml_host!r} is not a host of this fleet")
        if self.envoy.fallback_tier not in self.tiers:
            raise ValueError(f"envoy.fallback_tier {self.envoy.fallback_tier.value!r} has no hosts and no pools")
        check_placement(self.placement, self.hosts, self.pools, self.models)
        hold_ms = self.placement.scale_from_zero.hold_ms
        if hold_ms > self.picker.body_timeout_ms:
            raise ValueError(
                f"placement.scale_from_zero.hold_ms ({hold_ms}) is above picker.body_timeout_ms "
                f"({self.picker.body_timeout_ms}): Envoy waits no longer than that for the picker's answer"
            )
        return self

    def profile(self, model: ModelSpec | None, tier: Tier) -> Profile:
        """The scheduling profile for ``model`` on ``tier``: the model's, else the tier's, else the default."""
        if model is not None and model.profile is not None:
            return model.profile
        return self.picker.tiers.get(tier, self.picker.profile)

    def model(self, name: str) -> ModelSpec | None:
        for spec in self.models:
            if spec.name == name:
                return spec
        return None

    @property
    def tiers(self) -> tuple[Tier, ...]:
        """The tiers that have hosts or pools, in a stable order."""
        present = {h.tier for h in (*self.hosts, *self.pools)}
        return tuple(t for t in Tier if t in present)


def _check_pools(pools: tuple[PoolSpec, ...], hosts: tuple[HostSpec, ...]) -> None:
    _unique("pools", [p.name for p in pools])
    for i, pool in enumerate(pools):
        clash = [h.name for h in hosts if pool.named(h.name)]
        if clash:
            raise ValueError(f"hosts {clash} are named like the hosts of pool {pool.name!r} ({pool.name}-A-B-C-D)")
        for other in pools[:i]:
            shared = set(pool.ports) & set(other.ports)
            if other.dns.rstrip(".") == pool.dns.rstrip(".") and shared:
                raise ValueError(f"pools {other.name!r} and {pool.name!r} both use {pool.dns} port {min(shared)}")


def _unique(what: str, names: list[str]) -> None:
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{what}: names must be unique, repeated: {dupes}")
