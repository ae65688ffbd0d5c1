"""DNS discovery of the fleet's pools (``pools:`` in the fleet file), off the request path.

Every ``refresh_s`` each pool's name is resolved (A records: Envoy's clusters resolve the same name
``V4_ONLY``), through the fleet's ``dns_resolvers`` or the system's resolver. Each address is a host
(:meth:`~extproc.config.PoolSpec.host`). The picker turns :attr:`Discovery.hosts` plus the file's static
hosts into the fleet it routes over, through the same path as a config reload.

- A name that does not exist (NXDOMAIN) or has no A record is an **empty pool**: a headless Service whose
  pods are all gone or unready. Envoy reads such an answer the same way.
- Any other failure (timeout, SERVFAIL, refused) **keeps the last known hosts**: a DNS blip must not empty a
  tier. Their telemetry keeps them honest meanwhile (a host that is gone goes stale and is not picked).
- An address that a static host (or an earlier pool) already has on one of its ports is left out: one Triton
  is one host.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver
import structlog

from extproc.config import Fleet, HostSpec, PoolSpec, resolver_address

log = structlog.get_logger(__name__)

# Per resolution, all servers and retries included: dnspython's default (5 s) would let one lost answer
# delay the next refresh of a pool that refreshes every second.
_TIMEOUT_S: Final = 2.0


class DiscoveryError(Exception):
    """A pool's name could not be resolved now (timeout, server failure): not an answer about the pool."""


@dataclass(eq=False)
class _Pool:
    spec: PoolSpec
    addresses: frozenset[str] = frozenset()
    ok: bool | None = None  # whether the last resolution succeeded; None before the first


def _resolver(servers: tuple[str, ...] | None) -> dns.asyncresolver.Resolver:
    if servers is None:
        # /etc/resolv.conf: its nameservers, search domains and ndots, as Envoy's c-ares resolver reads them.
        return dns.asyncresolver.Resolver()
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [dns.nameserver.Do53Nameserver(*resolver_address(s)) for s in servers]
    return resolver


async def resolve(resolver: dns.asyncresolver.Resolver, name: str) -> frozenset[str]:
    """The IPv4 addresses of ``name``; empty when the name does not exist or has none. Raises
    :class:`DiscoveryError` when there is no usable answer."""
    try:
        # search=True: a relative name goes through the resolver's search domains, as in Envoy (c-ares).
        answer = await resolver.resolve(name, "A", lifetime=_TIMEOUT_S, search=True, raise_on_no_answer=False)
    except dns.resolver.NXDOMAIN:
        return frozenset()
    except (dns.exception.DNSException, OSError) as exc:  # OSError: e.g. no route to the DNS server
        raise DiscoveryError(f"{type(exc).__name__}: {exc}") from None
    return frozenset(record.address for record in answer.rrset or ())


class Discovery:
    """The pools of one fleet file and the hosts they resolved to.

    ``await refresh_once()`` resolves every pool now; ``run(on_change)`` re-resolves each pool every
    ``refresh_s`` and awaits ``on_change()`` after :attr:`hosts` changed. Built again on a config reload with
    the previous instance, whose pools keep their hosts until their name is resolved anew.
    """

    def __init__(self, fleet: Fleet, previous: Discovery | None = None) -> None:
        self._resolver = _resolver(fleet.dns_resolvers)
        self._static = {(h.address, port) for h in fleet.hosts for port in h.ports}
        self._pools = [_Pool(spec) for spec in fleet.pools]
        before = {p.spec.name: p for p in previous._pools} if previous is not None else {}
        for pool in self._pools:
            old = before.get(pool.spec.name)
            if old is not None and old.spec.dns == pool.spec.dns:
                pool.addresses, pool.ok = old.addresses, old.ok
        self._shadowed: frozenset[str] = frozenset()
        self.hosts: tuple[HostSpec, ...] = ()
        self.counts: dict[str, int] = {}
        self._update()

    async def refresh_once(self) -> bool:
        """Resolve every pool now; whether :attr:`hosts` changed."""
        changed = await asyncio.gather(*(self._refresh(pool) for pool in self._pools))
        return any(changed)

    async def run(self, on_change: Callable[[], Awaitable[None]]) -> None:
        """Re-resolve every pool on its own period until cancelled."""
        async with asyncio.TaskGroup() as group:
            for pool in self._pools:
                group.create_task(self._loop(pool, on_change), name=f"discovery:{pool.spec.name}")

    async def _loop(self, pool: _Pool, on_change: Callable[[], Awaitable[None]]) -> None:
        # A pool that a config reload just added is resolved at once, the others after their period.
        if pool.ok is None and await self._refresh(pool):
            await on_change()
        while True:
            await asyncio.sleep(pool.spec.refresh_s)
            if await self._refresh(pool):
                await on_change()

    async def _refresh(self, pool: _Pool) -> bool:
        spec = pool.spec
        try:
            addresses = await resolve(self._resolver, spec.dns)
        except DiscoveryError as exc:
            if pool.ok is not False:
                log.warning(
                    "pool_resolution_failing", pool=spec.name, dns=spec.dns, error=str(exc), note="keeping its hosts"
                )
            pool.ok = False
            return False
        if pool.ok is False:
            log.warning("pool_resolution_recovered", pool=spec.name, dns=spec.dns)
        pool.ok = True
        if addresses == pool.addresses:
            return False
        log.info(
            "pool_hosts_changed",
            pool=spec.name,
            dns=spec.dns,
            added=[spec.host(a).name for a in _sorted(addresses - pool.addresses)],
            removed=[spec.host(a).name for a in _sorted(pool.addresses - addresses)],
            hosts=len(addresses),
        )
        pool.addresses = addresses
        hosts = self.hosts
        self._update()
        return self.hosts != hosts

    def _update(self) -> None:
        taken = set(self._static)
        hosts: list[HostSpec] = []
        shadowed: set[str] = set()
        counts: dict[str, int] = {}
        for pool in self._pools:
            counts[pool.spec.name] = 0
            for address in _sorted(pool.addresses):
                host = pool.spec.host(address)
                endpoints = {(address, port) for port in host.ports}
                if endpoints & taken:
                    shadowed.add(host.name)
                    continue
                taken |= endpoints
                hosts.append(host)
                counts[pool.spec.name] += 1
        if shadowed - self._shadowed:
            log.warning(
                "pool_hosts_shadowed",
                hosts=sorted(shadowed - self._shadowed),
                note="their address and port belong to another host of the fleet; left out",
            )
        self._shadowed = frozenset(shadowed)
        self.hosts = tuple(hosts)
        self.counts = counts


def _sorted(addresses: frozenset[str]) -> list[str]:
    return sorted(addresses, key=ipaddress.ip_address)


def effective_fleet(config: Fleet, discovered: tuple[HostSpec, ...]) -> Fleet:
    """The fleet routed over: the file's static hosts, then the pools' discovered hosts."""
    if not discovered:
        return config
    return config.model_copy(update={"hosts": (*config.hosts, *discovered)})


async def resolve_pools(fleet: Fleet) -> Fleet:
    """``fleet`` with its pools resolved once into hosts, for one-shot commands (``extproc models``, ``status``)."""
    if not fleet.pools:
        return fleet
    discovery = Discovery(fleet)
    await discovery.refresh_once()
    return effective_fleet(fleet, discovery.hosts)
