"""Demand-driven placement (``placement``): when the fleet loads more copies of a model, and when it unloads
idle ones. Off by default; ``extproc placement explain`` shows what it would do (see
:mod:`extproc.placement`).

Why the settings look like this: a model's desired copies follow its demand over its measured capacity
per copy at ``target_utilization``; it scales down only below ``scale_down_utilization`` and after
``cooldown_s``, and only once every round over ``scale_down_after_s`` has wanted fewer copies, so that
neither a steady load nor one round that saw little demand (a stalled machine) makes it oscillate; it scales
up at once. Memory budgets come from GPU telemetry where the picker has it, else from the bytes declared
here; a model's footprint is declared, else learned from the memory change at its loads.
"""

from __future__ import annotations

from typing import Literal, Self

from pydantic import ByteSize, Field, PositiveFloat, ValidationInfo, field_validator, model_validator

from extproc.config.common import Port, PositiveMs, Strict, Tier
from extproc.config.hosts import HostSpec, PoolSpec
from extproc.config.models import ModelSpec

__all__ = ["ModelPlacement", "PlacementSpec", "ScaleFromZero", "check_placement"]


class ModelPlacement(Strict):
    """One model the controller manages (``placement.models.NAME``); models not listed are left alone."""

    # Copies (hosts with the model READY and routable) never fewer / more than these.
    min_copies: int = Field(default=1, ge=0, le=100_000)
    max_copies: int | None = Field(default=None, ge=1, le=100_000)
    # Hosts an operator placed the model on: the controller counts them but never unloads from them.
    pinned: tuple[str, ...] = ()
    # Load new copies only on hosts with every one of these labels (hosts[].labels, pools[].labels).
    labels: dict[str, str] = Field(default_factory=dict)
    # GPU (or host) memory one copy takes; absent: learned from the memory change at the controller's loads
    # of it, and until then placement.default_footprint_bytes.
    footprint_bytes: ByteSize | None = None
    # Requests per second one copy serves at full load: one number for every tier, or one per tier (a GPU
    # copy and a CPU copy differ by far); absent, or a tier not listed: measured (batch-cost fit, service time).
    capacity_rps: PositiveFloat | dict[Tier, PositiveFloat] | None = None

    def capacity(self, tier: str) -> float | None:
        """The declared capacity per copy on ``tier``, or None (measured)."""
        if isinstance(self.capacity_rps, dict):
            return next((float(v) for t, v in self.capacity_rps.items() if t.value == tier), None)
        return self.capacity_rps

    @model_validator(mode="after")
    def _bounds(self) -> Self:
        if self.max_copies is not None and self.max_copies < self.min_copies:
            raise ValueError(f"max_copies ({self.max_copies}) is below min_copies ({self.min_copies})")
        if len(set(self.pinned)) != len(self.pinned):
            raise ValueError(f"pinned repeats a host: {list(self.pinned)}")
        if self.max_copies is not None and len(self.pinned) > self.max_copies:
            raise ValueError(f"pinned names {len(self.pinned)} hosts, more than max_copies ({self.max_copies})")
        return self


class ScaleFromZero(Strict):
    """What a request gets for a model of ``placement.models`` that a host's repository has but no host has
    READY (``placement.scale_from_zero``). The picker that sees it loads the model on the host the
    controller would choose (its tiers, labels and memory budget), once however many requests ask."""

    # off: the request gets Triton's answer (404, the model is not loaded), nothing is loaded.
    # refuse: 503 with retry-after while the model loads; requests after it is READY are served.
    # hold: the request waits up to hold_ms for the model to be READY (and warm: Triton runs a model's
    # model_warmup before it reports it READY), then is routed; past that, 503 with retry-after.
    mode: Literal["off", "refuse", "hold"] = "off"
    # At most picker.body_timeout_ms: Envoy waits no longer for the picker's answer.
    hold_ms: PositiveMs = 8_000
    # A load that takes longer is given up (Triton may still finish it; the next request sees the copy).
    load_timeout_s: float = Field(default=120.0, gt=0, le=3600)
    # After a failed load, requests for the model get the answer of mode off for this long, instead of
    # asking a host that just failed again.
    retry_after_failure_s: float = Field(default=30.0, ge=0, le=3600)


class PlacementSpec(Strict):
    """The controller's settings (``placement``)."""

    enabled: bool = False
    # How often ``extproc placement run`` looks at demand and decides.
    interval_s: float = Field(default=15.0, ge=1, le=3600)
    # After a change to a model, no scale-down of it for this long (and no scale-up for up_cooldown_s).
    cooldown_s: float = Field(default=300.0, ge=0, le=86_400)
    up_cooldown_s: float = Field(default=30.0, ge=0, le=86_400)
    # A scale-down needs every round over this long to want fewer copies (one round's low demand may be a
    # stalled machine, not a change of load); absent: 4 rounds and at least 60 s.
    scale_down_after_s: float | None = Field(default=None, gt=0, le=86_400)
    # Loads and unloads started per round, over all models.
    max_concurrent_changes: int = Field(default=2, ge=1, le=1000)
    # Demand per copy, as a fraction of its capacity, that the controller aims at: it adds copies above it...
    target_utilization: float = Field(default=0.7, gt=0, le=1)
    # ...and removes them only below this lower bound (hysteresis).
    scale_down_utilization: float = Field(default=0.35, ge=0, lt=1)
    # Also add a copy when the mean queue wait over a model's copies exceeds this (ms); absent: not used.
    queue_ms: float | None = Field(default=None, gt=0)
    # Memory budget per host where the picker has no GPU memory telemetry: by host name, else by tier;
    # neither: no budget (loads are not limited by memory).
    host_memory_bytes: dict[str, ByteSize] = Field(default_factory=dict)
    tier_memory_bytes: dict[Tier, ByteSize] = Field(default_factory=dict)
    default_footprint_bytes: ByteSize = Field(default=ByteSize(2**30))
    # A file whose existence pauses ``extproc placement run`` (it keeps planning and logging, changes
    # nothing); relative paths are under runtime_dir. Absent: <runtime_dir>/placement.pause.
    pause_file: str | None = Field(default=None, min_length=1)
    models: dict[str, ModelPlacement] = Field(default_factory=dict)
    scale_from_zero: ScaleFromZero = ScaleFromZero()
    # Where ``extproc placement run`` serves its Prometheus metrics (/metrics, read-only: nothing there
    # changes the fleet, so no token guards it); absent: not served (``--metrics-port`` overrides).
    metrics_address: str = "127.0.0.1"
    metrics_port: Port | None = None

    @field_validator("scale_down_after_s")
    @classmethod
    def _at_least_a_round(cls, value: float | None, info: ValidationInfo) -> float | None:
        interval = info.data.get("interval_s")
        if value is not None and interval is not None and value < interval:
            raise ValueError(
                f"{value:g} s is shorter than interval_s ({interval:g} s): low demand must be seen over at least "
                "one round before a scale-down"
            )
        return value

    @property
    def scale_down_window_s(self) -> float:
        """How long low demand must last before a scale-down (``scale_down_after_s`` or its default)."""
        if self.scale_down_after_s is not None:
            return self.scale_down_after_s
        return max(60.0, 4 * self.interval_s)

    @model_validator(mode="after")
    def _hysteresis(self) -> Self:
        if self.scale_down_utilization >= self.target_utilization:
            raise ValueError(
                f"scale_down_utilization ({self.scale_down_utilization}) must be below target_utilization "
                f"({self.target_utilization}): without a gap between them the controller would oscillate"
            )
        return self

    def budget(self, host: str, tier: Tier) -> int | None:
        """The declared memory budget of ``host`` in bytes, or None."""
        declared = self.host_memory_bytes.get(host, self.tier_memory_bytes.get(tier))
        return None if declared is None else int(declared)


def check_placement(
    spec: PlacementSpec, hosts: tuple[HostSpec, ...], pools: tuple[PoolSpec, ...], models: tuple[ModelSpec, ...]
) -> None:
    """The checks that need the other sections: named hosts exist, pinned hosts are of the model's tiers."""
    tier_of = {h.name: h.tier for h in hosts}

    def known(host: str) -> bool:
        return host in tier_of or any(p.named(host) for p in pools)

    for host in spec.host_memory_bytes:
        if not known(host):
            raise ValueError(f"placement.host_memory_bytes: {host!r} is not a host of this fleet")
    tiers = {m.name: m.tiers for m in models}
    for name, model in spec.models.items():
        for host in model.pinned:
            if not known(host):
                raise ValueError(f"placement.models.{name}.pinned: {host!r} is not a host of this fleet")
            allowed = tiers.get(name)
            tier = tier_of.get(host)
            if allowed is not None and tier is not None and tier not in allowed:
                raise ValueError(
                    f"placement.models.{name}.pinned: {host!r} is of tier {tier.value!r}, not one of the "
                    f"model's tiers ({', '.join(t.value for t in allowed)})"
                )
