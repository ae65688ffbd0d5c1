"""Telemetry: poll loops that keep the Datastore current, entirely off the request path.

- :mod:`.triton_metrics`: Triton's Prometheus page → typed snapshot →
  :class:`~extproc.datapath.datastore.TritonLoad`.
- :mod:`.envoy_admin`: Envoy's ``/clusters?format=json`` → per-host :class:`~extproc.datapath.datastore.EnvoyView`.
- :mod:`.repository`: Triton's repository index (gRPC) → which models each host has READY.
- :mod:`.nvml`: GPU memory through NVML for the sidecar host.
- :mod:`.tls`: TLS to the hosts for all of the above, where ``envoy.upstream_tls`` says they speak it.
- :mod:`.http`: the GETs of the metrics page and ``/clusters``, over connections kept between polls.
- :mod:`.collector`: :class:`TelemetryCollector`, the loops that run all of the above.
"""

from extproc.telemetry.collector import TelemetryCollector

__all__ = ["TelemetryCollector"]
