"""The clusters: Triton's, one per tier and protocol (health checks, outlier detection, circuit breakers,
override_host load balancing, the spill tiers' hosts at priority 1), and the picker's."""

from __future__ import annotations

import datetime as dt
import ipaddress

from envoy_data_plane.envoy.config.cluster import v3 as cluster
from envoy_data_plane.envoy.config.core import v3 as core
from envoy_data_plane.envoy.config.endpoint import v3 as endpoint
from envoy_data_plane.envoy.extensions.clusters.common.dns import v3 as dns_common
from envoy_data_plane.envoy.extensions.clusters.dns import v3 as dns_cluster
from envoy_data_plane.envoy.extensions.load_balancing_policies.least_request import v3 as least_request
from envoy_data_plane.envoy.extensions.load_balancing_policies.override_host import v3 as override_host
from envoy_data_plane.envoy.extensions.network.dns_resolver.cares import v3 as cares
from envoy_data_plane.envoy.extensions.upstreams.http import v3 as upstream_http
from envoy_data_plane.envoy.type import v3 as type_v3
from envoy_data_plane.google.protobuf import Any as PbAny

from extproc.config import Fleet, PoolSpec, Tier, resolver_address
from extproc.datapath.headers import HOSTS_HEADER, PICKER_CLUSTER, cluster_name
from extproc.envoy_config.common import REST_HEALTH_PATH, _socket_address
from extproc.envoy_config.tls import _upstream_tls

_UPSTREAM_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
# Envoy's overprovisioning factor, in percent: the healthy share of priority 0 times this is the load it
# keeps; one healthy host in 10,000 still keeps all of it.
_ONLY_WHEN_NONE_HEALTHY = 1_000_000


def _triton_cluster(fleet: Fleet, tier: Tier, protocol: str) -> cluster.Cluster:
    name = cluster_name(tier.value, protocol)
    grpc = protocol == "grpc"
    hosts = [h for h in fleet.hosts if h.tier is tier]
    pools = [p for p in fleet.pools if p.tier is tier]
    # The hosts of the tiers this tier's models spill over to, at priority 1: the picker names them last in
    # a request's host list, so a try that cannot have reached its host (connect failure, refused stream) is
    # retried there when the tier's own hosts are gone; Envoy's own balancing (the picker not answering)
    # uses them only while no host of the tier is healthy. Envoy sums a host's counts over its clusters.
    spill = spill_tiers(fleet, tier)
    spill_hosts = [h for h in fleet.hosts if h.tier in spill]
    spill_pools = [p for p in fleet.pools if p.tier in spill]
    upstream_tls = fleet.envoy.upstream_tls
    if grpc:
        # Triton's gRPC port speaks HTTP/2 only (h2c); the health check is grpc.health.v1.Health/Check,
        # SERVING iff Triton is ready.
        protocol_options = core.Http2ProtocolOptions()
        health_check = core.HealthCheck(grpc_health_check=core.HealthCheckGrpcHealthCheck())
    else:
        protocol_options = None
        health_check = core.HealthCheck(http_health_check=core.HealthCheckHttpHealthCheck(path=REST_HEALTH_PATH))
    # Required, no default: a probe that takes over a second counts as a miss.
    health_check.timeout = dt.timedelta(seconds=1)
    # Envoy has no default interval. 1 s: a host that stops being ready leaves the rotation within ~2 s.
    health_check.interval = dt.timedelta(seconds=1)
    # Two misses (not one) so a single slow probe on a busy host does not take it out.
    health_check.unhealthy_threshold = 2
    # One success is enough to come back: readiness is a strong signal, and a starting fleet fills faster.
    health_check.healthy_threshold = 1
    # Envoy's default is 60 s for a cluster that has not carried traffic yet. The picker reads health from
    # Envoy's admin API and a Triton that starts after Envoy must be seen within a second, traffic or not.
    health_check.no_traffic_interval = dt.timedelta(seconds=1)

    triton = cluster.Cluster(
        name=name,
        # Envoy's default is 5 s; Triton hosts are on the local network, and a connect failure is retried
        # on another host, so fail fast.
        connect_timeout=dt.timedelta(seconds=1),
        load_assignment=endpoint.ClusterLoadAssignment(
            cluster_name=name,
            # Envoy's default factor (1.4) moves part of the traffic to priority 1 as soon as under 71 % of
            # the tier's hosts are healthy: one host of two ejected would send requests to another tier.
            # A factor this large keeps all of it on the tier while any of its hosts is healthy.
            policy=endpoint.ClusterLoadAssignmentPolicy(overprovisioning_factor=_ONLY_WHEN_NONE_HEALTHY),
            endpoints=[
                endpoint.LocalityLbEndpoints(
                    # A pool's name becomes one endpoint per A record: the addresses the picker names.
                    lb_endpoints=[_lb_endpoint(h.address, h.grpc_port if grpc else h.http_port) for h in hosts]
                    + [_lb_endpoint(p.dns, p.grpc_port if grpc else p.http_port) for p in pools]
                ),
                *(
                    [
                        endpoint.LocalityLbEndpoints(
                            priority=1,
                            lb_endpoints=[
                                _lb_endpoint(h.address, h.grpc_port if grpc else h.http_port) for h in spill_hosts
                            ]
                            + [_lb_endpoint(p.dns, p.grpc_port if grpc else p.http_port) for p in spill_pools],
                        )
                    ]
                    if spill_hosts or spill_pools
                    else []
                ),
            ],
        ),
        typed_extension_protocol_options={
            _UPSTREAM_PROTOCOL_OPTIONS: PbAny.pack(
                upstream_http.HttpProtocolOptions(
                    explicit_http_config=(
                        upstream_http.HttpProtocolOptionsExplicitHttpConfig(http2_protocol_options=protocol_options)
                        if grpc
                        # HTTP/1.1 is the default, spelt out: Triton's REST port.
                        else upstream_http.HttpProtocolOptionsExplicitHttpConfig(
                            http_protocol_options=core.Http1ProtocolOptions()
                        )
                    )
                )
            )
        },
        transport_socket=_upstream_tls(upstream_tls, grpc) if upstream_tls is not None else None,
        load_balancing_policy=_override_host_policy(),
        health_checks=[health_check],
        outlier_detection=_outlier_detection(),
        # The picker reads each host's requests in flight from these (a filtered GET /stats), a fraction of
        # what /clusters costs Envoy and the picker at fleet size.
        track_cluster_stats=cluster.TrackClusterStats(per_endpoint_stats=True),
        common_lb_config=cluster.ClusterCommonLbConfig(
            # Envoy's default panic threshold is 50 %: in a tier of 2 hosts one unhealthy host would make
            # Envoy ignore health and send half the traffic to the dead one. 0 disables panic mode: only
            # healthy, non-ejected hosts are used (an empty tier answers 503 at once).
            healthy_panic_threshold=type_v3.Percent(value=0.0),
        ),
        circuit_breakers=_circuit_breakers(
            # Defaults are 1024 connections/pending/requests: limits far above a fleet's capacity, since
            # admission control is the picker's job (it answers 429/503), not Envoy's.
            max_connections=10_000,
            max_pending_requests=10_000,
            max_requests=10_000,
            # Envoy's default is 3 (!) concurrent retries, so a burst of failures would stop retrying at
            # once. A budget instead: retries in flight are held to a fifth of the requests in flight (at
            # least 10), so hosts that fail under load are not sent more work than the clients send.
            retry_budget=cluster.CircuitBreakersThresholdsRetryBudget(
                budget_percent=type_v3.Percent(value=20.0), min_retry_concurrency=10
            ),
        ),
    )
    if pools or spill_pools:
        # Static IP hosts of the tier stay in the same cluster: an IP literal resolves to itself.
        triton.cluster_type = _dns_cluster(pools + spill_pools, fleet.dns_resolvers)
    else:
        triton.type = cluster.ClusterDiscoveryType.STATIC
    return triton


def spill_tiers(fleet: Fleet, tier: Tier) -> tuple[Tier, ...]:
    """The other tiers that a model served from ``tier`` may also be served from, in the fleet's order."""
    spill = {t for m in fleet.models if tier in m.tiers for t in m.tiers if t is not tier}
    return tuple(t for t in fleet.tiers if t in spill)


def _dns_cluster(pools: list[PoolSpec], resolvers: tuple[str, ...] | None) -> cluster.ClusterCustomClusterType:
    """Strict DNS: every A record of a pool's name is an endpoint, re-resolved every ``refresh_s``.

    A name that does not exist or has no address empties its endpoints (as in the picker); a failed
    resolution keeps them. An endpoint that leaves DNS but still passes its health check stays until it
    fails one (Envoy's eventually consistent discovery): requests in flight to it finish, and the picker no
    longer names it.
    """
    dns = dns_cluster.DnsCluster(
        # One clock per cluster: the tier's most frequent pool's. respect_dns_ttl stays off (the default):
        # the picker re-resolves every refresh_s too, so both follow the same clock whatever the TTL.
        dns_refresh_rate=dt.timedelta(seconds=min(p.refresh_s for p in pools)),
        # The picker reads A records only (the pool's hosts are IPv4 addresses); AUTO would prefer AAAA.
        dns_lookup_family=dns_common.DnsLookupFamily.V4_ONLY,
    )
    if resolvers is not None:
        cares_config = cares.CaresDnsResolverConfig(
            resolvers=[_socket_address(*resolver_address(r)) for r in resolvers],
            # The picker asks these servers and ignores /etc/resolv.conf: no search domains here either.
            dns_resolver_options=core.DnsResolverOptions(no_default_search_domain=True),
        )
        dns.typed_dns_resolver_config = core.TypedExtensionConfig(
            name="envoy.network.dns_resolver.cares", typed_config=PbAny.pack(cares_config)
        )
    return cluster.ClusterCustomClusterType(name="envoy.clusters.dns", typed_config=PbAny.pack(dns))


def _lb_endpoint(address: str, port: int) -> endpoint.LbEndpoint:
    return endpoint.LbEndpoint(endpoint=endpoint.Endpoint(address=_socket_address(address, port)))


def _override_host_policy() -> cluster.LoadBalancingPolicy:
    """The picker's choice (``x-triton-lb-hosts: ip:port[,ip:port...]``), least request when there is none.

    override_host only uses hosts of this cluster, so health checks, outlier detection and circuit breakers
    still apply; a header naming a foreign address falls through to the fallback policy.
    """
    fallback = cluster.LoadBalancingPolicy(
        policies=[
            cluster.LoadBalancingPolicyPolicy(
                typed_extension_config=core.TypedExtensionConfig(
                    name="envoy.load_balancing_policies.least_request",
                    typed_config=PbAny.pack(least_request.LeastRequest()),
                )
            )
        ]
    )
    policy = override_host.OverrideHost(
        override_host_sources=[override_host.OverrideHostOverrideHostSource(header=HOSTS_HEADER)],
        fallback_policy=fallback,
    )
    return cluster.LoadBalancingPolicy(
        policies=[
            cluster.LoadBalancingPolicyPolicy(
                typed_extension_config=core.TypedExtensionConfig(
                    name="envoy.load_balancing_policies.override_host", typed_config=PbAny.pack(policy)
                )
            )
        ]
    )


def _outlier_detection() -> cluster.OutlierDetection:
    return cluster.OutlierDetection(
        # Envoy's default is 5; a host that fails 3 requests in a row is out.
        consecutive_5xx=3,
        # ...but a 500 alone does not eject: Triton answers 500 to a malformed request (a JSON body it cannot
        # parse, a 'data' array that does not match its 'shape'), so any client could eject every healthy
        # host, one after the other, with a few bad requests.
        enforcing_consecutive_5xx=0,
        # Envoy's default enforcement for gateway failures is 0 %, i.e. only counted. Besides the host's own
        # 502/503/504 answers, Envoy counts a timeout as a 504 and a connect failure or reset as a 503, so a
        # host that stops answering is out after 3 of them.
        consecutive_gateway_failure=3,
        enforcing_consecutive_gateway_failure=100,
        # Not split_external_local_origin_errors: there, each connection Envoy opens successfully clears
        # the count of timeouts, and a host that accepts connections but never answers (a stopped or hung
        # process: the kernel still accepts) gets a new HTTP/1 connection for nearly every request, so it
        # would reach 3 timeouts in a row only by chance, seconds late.
        # Envoy's defaults: evaluated every 10 s, ejected for 30 s (growing to 300 s). A fleet of a few
        # hosts cannot spare one for that long, nor keep a failing one for 10 s.
        interval=dt.timedelta(seconds=1),
        base_ejection_time=dt.timedelta(seconds=5),
        max_ejection_time=dt.timedelta(seconds=30),
        # Envoy ejects only while 100 * (ejected + 1) / hosts <= max_ejection_percent; the default 10 means
        # *never* in a fleet under 10 hosts. 50 % plus always_eject_one_host: at least one host can always
        # be ejected (also in a tier of 1 or 2), and never more than half of a larger tier, so a failure
        # that is not the hosts' fault (a bad model, a bad client) cannot empty a tier.
        max_ejection_percent=50,
        always_eject_one_host=True,
        # Envoy's default (true) puts an ejected host back as soon as it passes an active health check,
        # i.e. within a second here, although a host that is "ready" but failing requests is exactly what
        # outlier detection is for. Ejections last their ejection time.
        successful_active_health_check_uneject_host=False,
    )


def _circuit_breakers(
    *,
    max_connections: int,
    max_pending_requests: int,
    max_requests: int,
    max_retries: int | None = None,
    retry_budget: cluster.CircuitBreakersThresholdsRetryBudget | None = None,
) -> cluster.CircuitBreakers:
    return cluster.CircuitBreakers(
        thresholds=[
            cluster.CircuitBreakersThresholds(
                priority=core.RoutingPriority.DEFAULT,
                max_connections=max_connections,
                max_pending_requests=max_pending_requests,
                max_requests=max_requests,
                max_retries=max_retries,
                retry_budget=retry_budget,
            )
        ]
    )


def _picker_cluster(fleet: Fleet) -> cluster.Cluster:
    # One endpoint per picker worker socket (a TCP port shared by the workers is listed once).
    addresses = [_picker_address(listen) for listen in dict.fromkeys(fleet.picker.listen_addresses)]
    discovery = addresses[0][1]
    return cluster.Cluster(
        name=PICKER_CLUSTER,
        type=discovery,
        # The picker is local (a Unix socket by default); if it cannot be reached within 250 ms the request
        # should fail open rather than wait out Envoy's 5 s default.
        connect_timeout=dt.timedelta(milliseconds=250),
        load_assignment=endpoint.ClusterLoadAssignment(
            cluster_name=PICKER_CLUSTER,
            endpoints=[
                endpoint.LocalityLbEndpoints(
                    lb_endpoints=[
                        endpoint.LbEndpoint(endpoint=endpoint.Endpoint(address=address)) for address, _ in addresses
                    ]
                )
            ],
        ),
        typed_extension_protocol_options={
            _UPSTREAM_PROTOCOL_OPTIONS: PbAny.pack(
                upstream_http.HttpProtocolOptions(
                    explicit_http_config=upstream_http.HttpProtocolOptionsExplicitHttpConfig(
                        # gRPC needs HTTP/2. Keepalive pings notice a dead picker connection (TCP picker on
                        # another machine) instead of letting requests time out on it one by one.
                        http2_protocol_options=core.Http2ProtocolOptions(
                            connection_keepalive=core.KeepaliveSettings(
                                interval=dt.timedelta(seconds=30), timeout=dt.timedelta(seconds=5)
                            )
                        )
                    )
                )
            )
        },
        circuit_breakers=_circuit_breakers(
            # ext_proc opens one gRPC stream per HTTP request, and over HTTP/2 max_requests (default 1024)
            # is the limit that binds: above it every request would fail open. Never let Envoy be the limit.
            max_connections=1_024,
            max_pending_requests=1_000_000,
            max_requests=1_000_000,
            # The ext_proc client does not retry; Envoy's default.
            max_retries=3,
        ),
    )


def _picker_address(listen: str) -> tuple[core.Address, cluster.ClusterDiscoveryType]:
    """``unix:PATH`` → a pipe address; ``HOST:PORT`` → a socket address (resolved by DNS unless an IP)."""
    if listen.startswith("unix:"):
        # Relative paths stay relative: they resolve against Envoy's working directory, as the picker's do.
        return core.Address(pipe=core.Pipe(path=listen.removeprefix("unix:"))), cluster.ClusterDiscoveryType.STATIC
    host, _, port = listen.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        # A hostname: STATIC clusters take IP literals only.
        return _socket_address(host, int(port)), cluster.ClusterDiscoveryType.STRICT_DNS
    return _socket_address(host, int(port)), cluster.ClusterDiscoveryType.STATIC
