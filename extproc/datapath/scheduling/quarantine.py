"""Queries of death: a request that was in flight when its host died is not sent to another host.

Envoy retries a request only where it cannot have reached its host, so a request that crashes a Triton
host kills that one host, once, and its client gets a 503. What the gateway must also avoid is the client
(or its retry loop) sending the same request again, to the next host. The picker cannot see which request
crashed a host; it sees hosts go down (Envoy's health checks and outlier ejection, polled every
``poll.envoy_admin_ms``) and it remembers which requests it sent where (a fingerprint of the request: the
model, its version and a hash of the body's first bytes).

When a host goes down, every fingerprint routed to it in the ``window_s`` before is a suspect, and is
refused (503 with the reason and ``retry-after``) for ``hold_s``, unless there is evidence against it: the
same fingerprint went to a host that is still up in the meantime, or was routed several times
(``_HARMLESS_AFTER``) in all: a query of death kills the first host that runs it, and the picker stops naming
a dead host within a poll, so it is not seen routed again and again. This keeps a fleet whose clients all send
the same request serving when a host dies for another reason, also on a tier of one host. A suspect whose
host comes back is still refused until its hold ends.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Final

import structlog

from extproc.datapath.datastore import Datastore
from extproc.datapath.metrics import PickerMetrics

__all__ = ["Quarantine"]

log = structlog.get_logger(__name__)

# Fingerprints remembered (least recently routed forgotten first): far more than the requests a fleet
# routes in ``window_s``; each costs a few hundred bytes.
_REMEMBERED: Final = 50_000
# Routed this often, a request is evidently not one that kills its host.
_HARMLESS_AFTER: Final = 3


class _Routes:
    """Where one fingerprint was routed: each host's last time, and how often in all."""

    __slots__ = ("count", "hosts")

    def __init__(self) -> None:
        self.count = 0
        self.hosts: dict[str, float] = {}


class Quarantine:
    """Remembers where requests went; refuses those in flight on a host when it went down."""

    def __init__(self, datastore: Datastore, metrics: PickerMetrics, hold_s: float, window_s: float) -> None:
        self._store = datastore
        self._metrics = metrics
        self._hold_s = hold_s
        self._window_s = window_s
        # fingerprint → where it was routed (times: monotonic, the datastore's clock).
        self._routed: OrderedDict[int, _Routes] = OrderedDict()
        self._until: dict[int, float] = {}  # quarantined fingerprint → end of its hold
        self._down: set[str] = set()
        self._layout = -1

    def use(self, datastore: Datastore) -> None:
        """A new datastore (config reload): hosts that stay keep their names, so what is known stays valid."""
        self._store = datastore
        self._layout = -1

    def refused_for(self, fingerprint: int) -> float:
        """Seconds left of ``fingerprint``'s quarantine; 0 when it may be routed."""
        self._follow_hosts()
        until = self._until.get(fingerprint)
        if until is None:
            return 0.0
        left = until - self._store.now()
        if left <= 0:
            del self._until[fingerprint]
            return 0.0
        return left

    def holding(self) -> bool:
        """Whether any request is quarantined now (the picker then reads a REST body's first chunk before
        routing it, so that a quarantined one never reaches a host)."""
        self._follow_hosts()
        if self._until:
            now = self._store.now()
            for fingerprint in [f for f, until in self._until.items() if until <= now]:
                del self._until[fingerprint]
        return bool(self._until)

    def routed(self, fingerprint: int, host: str) -> None:
        """The request went to ``host`` (the first of the hosts handed to Envoy: the others get it only when
        it could not reach that one)."""
        routes = self._routed.get(fingerprint)
        if routes is None:
            if len(self._routed) >= _REMEMBERED:
                self._routed.popitem(last=False)
            routes = self._routed[fingerprint] = _Routes()
        else:
            self._routed.move_to_end(fingerprint)
        routes.count += 1
        routes.hosts[host] = self._store.now()

    def _follow_hosts(self) -> None:
        """Notice hosts that went down since the datastore's layout last changed (an ejection or a failed
        health check in Envoy's poll changes it)."""
        if self._layout == self._store.layout:
            return
        self._layout = self._store.layout
        down = {name for name, host in self._store.hosts.items() if host.envoy.unhealthy or host.envoy.ejected}
        for host in down - self._down:
            self._went_down(host, down)
        self._down = down

    def _went_down(self, host: str, down: set[str]) -> None:
        if self._hold_s <= 0:
            return
        now = self._store.now()
        since = now - self._window_s
        suspects = cleared = 0
        for fingerprint, routes in self._routed.items():
            at = routes.hosts.get(host)
            if at is None or at < since:
                continue
            if routes.count >= _HARMLESS_AFTER or any(
                other not in down and t >= since for other, t in routes.hosts.items()
            ):
                cleared += 1
                continue
            self._until[fingerprint] = now + self._hold_s
            suspects += 1
        self._metrics.quarantined.inc(suspects)
        if suspects or cleared:
            log.warning(
                "host_down_requests_quarantined",
                host=host,
                quarantined=suspects,
                cleared=cleared,
                hold_s=self._hold_s,
            )
