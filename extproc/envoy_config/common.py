"""The names the modules of :mod:`extproc.envoy_config` share (listeners, filters, the route configuration,
Triton's path prefixes), and the socket addresses they all write."""

from __future__ import annotations

from envoy_data_plane.envoy.config.core import v3 as core

# Stats of the HTTP connection manager (both listeners) are under ``http.<STAT_PREFIX>.``, e.g.
# ``http.ingress.ext_proc.streams_started``.
STAT_PREFIX = "ingress"
ROUTE_CONFIG_NAME = "triton"
HTTP_LISTENER = "http"
HTTPS_LISTENER = "https"

# Filter names: the HCM looks up per-route configs (typed_per_filter_config) by these.
HEADER_MUTATION_FILTER = "envoy.filters.http.header_mutation"
EXT_PROC_FILTER = "envoy.filters.http.ext_proc"
BUFFER_FILTER = "envoy.filters.http.buffer"
ROUTER_FILTER = "envoy.filters.http.router"

REST_HEALTH_PATH = "/v2/health/ready"
# The substitution formatter for the response header of ``expose_upstream_host``: the address of the host
# the router picked, ``ip:port`` — the same form as the override_host list the picker sends.
UPSTREAM_HOST_FORMAT = "%UPSTREAM_HOST%"


def _socket_address(address: str, port: int) -> core.Address:
    return core.Address(socket_address=core.SocketAddress(address=address, port_value=port))
