"""``python -m benchmarks.fleet``: what the picker's telemetry costs at fleet size (issue 19, item 1).

N emulated Triton hosts are served by one asyncio process (:mod:`benchmarks.fleet.emulator`) from pages
recorded from a real Triton host (``recorded/``, written by ``python -m benchmarks.fleet.record``): the
``/metrics`` page of four models of ``triton_models/``, a GPU-shaped page with ``nv_gpu_*`` series
synthesised in Triton's format, the gRPC repository index and model configs. Their counters advance at
``--rate`` requests/s per host. ``--real K`` adds K real Triton hosts. The real picker (``extproc serve``)
and a real Envoy rendered from the fleet file run beside them, as ``extproc up`` starts them.

Reported per phase (idle, then counters advancing): the CPU of the picker, Envoy and the emulator, the
picker's RSS and CPU per host-second, telemetry age p50/p99/max per source from the picker's ``/status``,
the size, fetch and parse time of Envoy's ``/clusters`` JSON and how often the picker read it, and the
requests each emulated host sees per second (scrapes, index and config calls, Envoy's health checks).
``--profile FILE`` runs the picker under cProfile. How: :mod:`benchmarks.fleet.bench`.

    .venv/bin/python -m benchmarks.fleet --hosts 300 --rate 20 --duration 20 --output benchmarks/results/fleet-300.json
"""
