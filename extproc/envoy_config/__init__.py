"""Envoy's bootstrap, rendered from the fleet file with envoy-data-plane's typed config objects.

``extproc envoy-config`` writes :func:`render_yaml`'s output; ``envoy/envoy.yaml`` is that output for
``deploy/local/fleet.yaml``. Every Envoy message below is a typed betterproto2 dataclass, and typed extension
configs are packed with ``Any.pack``, so a misspelt field fails here rather than in Envoy, and
``to_dict`` writes each ``@type`` itself.

What the config does, in request order:

0. Envoy answers itself, before any host is picked: 431 for headers over ``envoy.max_request_headers_kb``;
   413 for a ``content-length`` over ``envoy.max_request_bytes`` (route ``too_large``; a REST inference body
   without one, chunked, is buffered up to that size by the ``buffer`` filter, then 413; every other
   inference body streams); 415 for a compressed REST body; 403 (gRPC: PERMISSION_DENIED) for anything but
   the client APIs (inference, metadata, readiness, statistics if allowed: :mod:`extproc.client_api`, whose
   tables the picker also applies on its Endpoint Picker listener), naming the API and why the gateway does
   not offer it; 404 outside Triton's API.
1. The HTTP connection manager's early header mutation strips the routing headers and the admin key's
   (:data:`~extproc.datapath.headers.STRIPPED_HEADERS`) from the client's request before the route is selected, so only
   the picker can choose a tier or a host, even when the picker fails open; the ``header_mutation`` filter
   strips them again.
2. ``ext_proc`` asks the picker (cluster :data:`~extproc.datapath.headers.PICKER_CLUSTER`), which answers with the tier
   header (selects the route, hence the tier's cluster) and the hosts header (read by the cluster's
   ``override_host`` load-balancing policy). If the picker does not answer, the request goes on unchanged
   (fail open) and takes the fallback routes to ``envoy.fallback_tier``, whose clusters balance by least
   request.
3. The router sends it to the cluster of the matched route, without the REST body's content type, and
   retries only where the request cannot have reached the host (or the host said it could not serve it).

Settings that differ from Envoy's defaults carry a comment saying why.

The modules, by job: :mod:`~extproc.envoy_config.bootstrap` (the bootstrap, admin, runtime, overload manager),
:mod:`~extproc.envoy_config.listeners` (listeners, HTTP connection manager, HTTP filters),
:mod:`~extproc.envoy_config.routes` (the route configuration), :mod:`~extproc.envoy_config.clusters` (Triton's
clusters and the picker's), :mod:`~extproc.envoy_config.tls` (transport sockets) and
:mod:`~extproc.envoy_config.common` (the names they share).
"""

from extproc.envoy_config.bootstrap import RUNTIME_FLAGS, build_bootstrap, render_bootstrap, render_yaml
from extproc.envoy_config.clusters import spill_tiers
from extproc.envoy_config.common import (
    BUFFER_FILTER,
    EXT_PROC_FILTER,
    HEADER_MUTATION_FILTER,
    HTTP_LISTENER,
    HTTPS_LISTENER,
    REST_HEALTH_PATH,
    ROUTE_CONFIG_NAME,
    ROUTER_FILTER,
    STAT_PREFIX,
    UPSTREAM_HOST_FORMAT,
)

__all__ = [
    "BUFFER_FILTER",
    "EXT_PROC_FILTER",
    "HEADER_MUTATION_FILTER",
    "HTTPS_LISTENER",
    "HTTP_LISTENER",
    "REST_HEALTH_PATH",
    "ROUTER_FILTER",
    "ROUTE_CONFIG_NAME",
    "RUNTIME_FLAGS",
    "STAT_PREFIX",
    "UPSTREAM_HOST_FORMAT",
    "build_bootstrap",
    "render_bootstrap",
    "render_yaml",
    "spill_tiers",
]
