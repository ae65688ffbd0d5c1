"""One look at the fleet for ``extproc status``: every picker's ``/status`` and every Envoy's view, asked at
once."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime

from extproc.config import HostSpec
from extproc.ops import OpsError
from extproc.ops.status.clients import EnvoyApi, EnvoyHost, PickerApi, PickerStatus, envoy_hosts

__all__ = ["Snapshot", "collect", "snapshot_ok"]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What ``extproc status`` shows: each picker's ``/status`` (or why not) and each Envoy's view."""

    hosts: tuple[HostSpec, ...]
    pickers: tuple[tuple[str, PickerStatus | str], ...]  # url → status, or the error message
    envoys: tuple[tuple[str, Mapping[str, EnvoyHost] | str], ...]
    taken_at: datetime


def collect(hosts: Sequence[HostSpec], pickers: Sequence[PickerApi], envoys: Sequence[EnvoyApi]) -> Snapshot:
    """Ask every picker and Envoy at once; an unreachable one is reported in the snapshot, not raised."""

    def picker_view(picker: PickerApi) -> PickerStatus | str:
        try:
            return picker.status()
        except OpsError as exc:
            return str(exc)

    def envoy_view(envoy: EnvoyApi) -> Mapping[str, EnvoyHost] | str:
        try:
            return envoy_hosts(hosts, envoy.endpoints())
        except OpsError as exc:
            return str(exc)

    with ThreadPoolExecutor(max_workers=max(1, len(pickers) + len(envoys))) as pool:
        picker_futures = [pool.submit(picker_view, p) for p in pickers]
        envoy_futures = [pool.submit(envoy_view, e) for e in envoys]
        return Snapshot(
            hosts=tuple(hosts),
            pickers=tuple((p.url, f.result()) for p, f in zip(pickers, picker_futures, strict=True)),
            envoys=tuple((e.url, f.result()) for e, f in zip(envoys, envoy_futures, strict=True)),
            taken_at=datetime.now(UTC),
        )


def snapshot_ok(snapshot: Snapshot) -> bool:
    return bool(snapshot.pickers) and all(not isinstance(s, str) for _, s in snapshot.pickers)
