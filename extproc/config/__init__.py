"""The fleet file: one typed, validated object, loaded once and passed down.

A fleet file (YAML) names the Triton hosts, the models and how to classify their requests, the picker's
settings and Envoy's listeners. :func:`load_fleet` refuses an invalid file with a :class:`ConfigError` that
names the file, the key and the problem, so every command can refuse to start with a useful message.

The modules, by section: :mod:`~extproc.config.hosts` (``hosts`` and ``pools``, addresses),
:mod:`~extproc.config.models` (``models``, their tier rules and scheduling profiles),
:mod:`~extproc.config.picker` (``picker``), :mod:`~extproc.config.envoy` (``envoy``),
:mod:`~extproc.config.placement` (``placement``, demand-driven model placement),
:mod:`~extproc.config.fleet` (the whole file and its cross-section checks), :mod:`~extproc.config.loading`
(reading a file, the error messages) and :mod:`~extproc.config.common` (what they share).
"""

from extproc.config.common import Port, PositiveMs, Tier
from extproc.config.envoy import EnvoySpec, Listener, TlsSpec, UpstreamTlsSpec
from extproc.config.fleet import Fleet
from extproc.config.hosts import HostSpec, LaunchSpec, PoolSpec, is_ip, resolver_address
from extproc.config.loading import ConfigError, file_stamp, key_path, load_fleet, parse_fleet
from extproc.config.models import FilterName, ModelSpec, PickerName, Profile, ScorerName, TierRule
from extproc.config.picker import (
    DeadlineShares,
    EppSpec,
    HeaderName,
    OverloadSpec,
    PickerSpec,
    PollSpec,
    QuarantineSpec,
    ReplicasSpec,
    SaturationSpec,
)
from extproc.config.placement import ModelPlacement, PlacementSpec

__all__ = [
    "ConfigError",
    "DeadlineShares",
    "EnvoySpec",
    "EppSpec",
    "FilterName",
    "Fleet",
    "HeaderName",
    "HostSpec",
    "LaunchSpec",
    "Listener",
    "ModelPlacement",
    "ModelSpec",
    "OverloadSpec",
    "PickerName",
    "PickerSpec",
    "PlacementSpec",
    "PollSpec",
    "PoolSpec",
    "Port",
    "PositiveMs",
    "Profile",
    "QuarantineSpec",
    "ReplicasSpec",
    "SaturationSpec",
    "ScorerName",
    "Tier",
    "TierRule",
    "TlsSpec",
    "UpstreamTlsSpec",
    "file_stamp",
    "is_ip",
    "key_path",
    "load_fleet",
    "parse_fleet",
    "resolver_address",
]
