"""The overhead benchmark's stack: its settings, its fleet, and the Envoy configurations of the upstream and
of each variant's gateway (rendered by :func:`extproc.envoy_config.render_bootstrap`, then transformed)."""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from benchmarks.gateway import epp_cluster, gateway_bootstrap, listen_address, pool_listener

# envoy_config (envoy-data-plane) and the runtime are imported where they are used.
from extproc.config import Fleet, parse_fleet
from extproc.datapath.headers import EPP_DESTINATION_HEADER, HOSTS_HEADER, PICKER_CLUSTER

# The variants every run measures; ``--epp`` adds EPP_VARIANT (the picker in the Endpoint Picker Protocol,
# behind a gateway-shaped Envoy), which needs a processor and a gateway of its own.
VARIANTS: Final = ("plain", "bare", "picker")
EPP_VARIANT: Final = "epp"
ALL_VARIANTS: Final = (*VARIANTS, EPP_VARIANT)
# What a processor prints on stdout once it serves (see benchmarks.overhead.server).
READY_LINE: Final = "READY"
PROCESSOR_VARIANTS: Final = ("bare", "picker", EPP_VARIANT)
DEFAULT_RATES: Final = (200.0, 500.0, 1000.0)
MODEL: Final = "mlp"
# A 1x4 FP32 REST inference request, as a small real client would send it.
REQUEST_BODY: Final = b'{"inputs":[{"name":"INPUT0","shape":[1,4],"datatype":"FP32","data":[0.5,-1.25,2.0,0.125]}]}'
# The upstream's answer and the header it echoes (what the picker set), for the start-up check.
UPSTREAM_BODY: Final = '{"outputs":[]}'
ECHO_HEADER: Final = "x-bench-echo-hosts"
# The same for the EPP dialect's answer (x-gateway-destination-endpoint).
ECHO_DESTINATION_HEADER: Final = "x-bench-echo-destination"
START_TIMEOUT_S: Final = 60.0


class BenchError(RuntimeError):
    """The benchmark could not start or run its stack."""


def find_envoy() -> str:
    from extproc.runtime import stack

    return stack.find_envoy()


def progress(message: str) -> None:
    print(f"[bench overhead] {message}", file=sys.stderr, flush=True)


@dataclass
class Settings:
    rates: tuple[float, ...] = DEFAULT_RATES
    duration_s: float = 6.0
    max_duration_s: int = 6
    rounds: int = 5
    connections: int = 16
    hosts: int = 3
    warmup_s: float = 0.5
    wrk: str | None = None
    soak: int = 0
    soak_rate: float = 1000.0
    soak_variant: str = "picker"
    # What the bare processor answers: "empty" (change nothing) or "routing" (the picker's kind of answer).
    bare_answer: str = "empty"
    # picker.check_rest_bodies of the gateway's fleet: off, REST inference bodies bypass the picker.
    check_rest_bodies: bool = True
    # Why there is no wrk (None: it was found).
    wrk_missing: str | None = None
    # Also measure EPP_VARIANT.
    epp: bool = False

    @property
    def variants(self) -> tuple[str, ...]:
        return ALL_VARIANTS if self.epp else VARIANTS


# ------------------------------------------------------------------------------------------ configuration


def bench_fleet(
    upstream_ports: Sequence[int],
    spare_ports: Sequence[int],
    picker_listen: str,
    gateway_port: int,
    admin_port: int,
    check_rest_bodies: bool = True,
) -> Fleet:
    """The gateway's fleet: one GPU-tier host per upstream port, all serving :data:`MODEL`.

    A host's REST port is an upstream listener; its gRPC and metrics ports (``spare_ports``, two per host)
    are free ports nobody serves: no gRPC is sent, and there is no telemetry to scrape.
    """
    if len(spare_ports) < 2 * len(upstream_ports):
        raise ValueError("need two spare ports per host")
    hosts = [
        {
            "name": f"up{i}",
            "address": "127.0.0.1",
            "http_port": port,
            "grpc_port": spare_ports[2 * i],
            "metrics_port": spare_ports[2 * i + 1],
            "tier": "gpu",
        }
        for i, port in enumerate(upstream_ports)
    ]
    return parse_fleet(
        {
            "hosts": hosts,
            "models": [{"name": MODEL, "tiers": ["gpu"]}],
            "picker": {
                "listen": picker_listen,
                "check_rest_bodies": check_rest_bodies,
                # The echo upstreams publish no Triton counters, so the picker cannot tell how fast their
                # queues drain: its in-flight estimate only grows between Envoy polls and would reach the
                # soft limits at these rates. Admission still runs (and costs what it costs), never binds.
                "saturation": {"max_in_flight": 1_000_000, "max_queue_ms": 3_600_000},
            },
            "envoy": {
                "listener": {"address": "127.0.0.1", "port": gateway_port},
                "admin": {"address": "127.0.0.1", "port": admin_port},
                "tls": None,
            },
        },
        "<bench overhead>",
    )


def http_managers(boot: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    for listener in boot["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                yield network_filter["typed_config"]


def strip_ext_proc(boot: dict[str, Any]) -> None:
    """In place: remove the ext_proc filter, its per-route configs and the picker cluster."""
    from extproc.envoy_config import EXT_PROC_FILTER

    for manager in http_managers(boot):
        manager["http_filters"] = [f for f in manager["http_filters"] if f["name"] != EXT_PROC_FILTER]
        for vhost in manager["route_config"]["virtual_hosts"]:
            for route in vhost["routes"]:
                per_filter = route.get("typed_per_filter_config")
                if per_filter is not None:
                    per_filter.pop(EXT_PROC_FILTER, None)
                    if not per_filter:
                        del route["typed_per_filter_config"]
    resources = boot["static_resources"]
    resources["clusters"] = [c for c in resources["clusters"] if c["name"] != PICKER_CLUSTER]


def point_picker_cluster(boot: dict[str, Any], listen: str) -> None:
    """In place: the picker cluster's one endpoint becomes ``listen``."""
    for cluster in boot["static_resources"]["clusters"]:
        if cluster["name"] == PICKER_CLUSTER:
            cluster["load_assignment"]["endpoints"] = [
                {"lb_endpoints": [{"endpoint": {"address": listen_address(listen)}}]}
            ]
            return
    raise ValueError(f"the bootstrap has no {PICKER_CLUSTER} cluster")


def variant_bootstrap(
    base: Mapping[str, Any], variant: str, *, listen_port: int, admin_port: int, picker_listen: str | None
) -> dict[str, Any]:
    """A copy of the rendered gateway bootstrap for one variant, on its own listener and admin ports.

    ``plain`` loses ext_proc (filter, per-route configs, picker cluster); ``bare`` and ``picker`` keep the
    rendered config and point the picker cluster at ``picker_listen``. TLS is not rendered (the fleet has
    none), so the config has exactly one listener.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}")
    boot = copy.deepcopy(dict(base))
    listeners = boot["static_resources"]["listeners"]
    if len(listeners) != 1:
        raise ValueError(f"expected one listener (no TLS), got {len(listeners)}")
    listeners[0]["address"]["socket_address"]["port_value"] = listen_port
    boot["admin"]["address"]["socket_address"]["port_value"] = admin_port
    if variant == "plain":
        strip_ext_proc(boot)
    else:
        if picker_listen is None:
            raise ValueError(f"variant {variant!r} needs the processor's listen address")
        point_picker_cluster(boot, picker_listen)
    return boot


def epp_bootstrap(fleet: Fleet, *, listen_port: int, admin_port: int, picker_listen: str) -> dict[str, Any]:
    """The ``epp`` variant's gateway: not a transformation of the rendered one but the Envoy a GIE gateway
    builds (:mod:`benchmarks.gateway`) for a pool of the fleet's hosts, its endpoint picker at
    ``picker_listen`` in plaintext, as the other processors are reached (so the dialects differ, not the
    transports). The listener's stat prefix is the rendered gateway's, so the same counters are read."""
    from extproc.envoy_config import STAT_PREFIX

    return gateway_bootstrap(
        admin_port,
        [pool_listener(STAT_PREFIX, listen_port, PICKER_CLUSTER)],
        [(h.address, h.http_port) for h in fleet.hosts],
        [(h.address, h.grpc_port) for h in fleet.hosts],
        [epp_cluster(PICKER_CLUSTER, picker_listen, tls=False)],
    )


def http_filter_names(boot: Mapping[str, Any]) -> list[str]:
    return [f["name"] for manager in http_managers(boot) for f in manager["http_filters"]]


def upstream_bootstrap(ports: Sequence[int], admin_port: int) -> dict[str, Any]:
    """The trivial upstream: one listener per port, each answering 200 with a small JSON body at once.

    Listener ``i`` has stat prefix ``up<i>``, so ``http.up<i>.downstream_rq_total`` counts what each host
    got. The response echoes the routing header the gateway sent: ours (``x-bench-echo-hosts``) and the
    Endpoint Picker Protocol's (``x-bench-echo-destination``).
    """
    router = {
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
    }
    listeners = []
    for i, port in enumerate(ports):
        manager = {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
            ".HttpConnectionManager",
            "stat_prefix": f"up{i}",
            "route_config": {
                "name": "upstream",
                "virtual_hosts": [
                    {
                        "name": "all",
                        "domains": ["*"],
                        "routes": [
                            {
                                "match": {"prefix": "/"},
                                "direct_response": {"status": 200, "body": {"inline_string": UPSTREAM_BODY}},
                                "response_headers_to_add": [
                                    {"header": {"key": ECHO_HEADER, "value": f"%REQ({HOSTS_HEADER})%"}},
                                    {
                                        "header": {
                                            "key": ECHO_DESTINATION_HEADER,
                                            "value": f"%REQ({EPP_DESTINATION_HEADER})%",
                                        }
                                    },
                                    {"header": {"key": "content-type", "value": "application/json"}},
                                ],
                            }
                        ],
                    }
                ],
            },
            "http_filters": [router],
        }
        listeners.append(
            {
                "name": f"up{i}",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                "filter_chains": [
                    {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}]}
                ],
            }
        )
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {"listeners": listeners},
    }
