"""The fleet simulator: a deterministic discrete-event simulation of Triton hosts, Envoy gateways and the
picker's telemetry, in which the real :class:`~extproc.datapath.scheduling.scheduler.Scheduler` makes the decisions.

``python -m benchmarks.sim --scenario NAME|FILE [--seed N] [--policies ...] [--pickers 1 2 4 8] [--output FILE]``
runs one scenario of ``benchmarks/scenarios/sim/``; ``--all`` runs the family and prints one table.

- :mod:`~benchmarks.sim.scenario`: the scenario files (hosts, model batch timings, load, events);
- :mod:`~benchmarks.sim.trace`: the seeded arrivals and request sizes every policy replays;
- :mod:`~benchmarks.sim.engine`: the event loop, Triton's dynamic batcher and counters, Envoy's retries;
- :mod:`~benchmarks.sim.policies`: round robin, least request, the simple expected-completion picker, the
  real picker and the oracle;
- :mod:`~benchmarks.sim.report` and :mod:`~benchmarks.sim.cli`: summaries, tables, JSON;
- :mod:`~benchmarks.sim.diagnose` (``python -m benchmarks.sim.diagnose -s NAME``): the picker's in-flight
  estimates, work and batch-cost fits at its decisions against what the simulated fleet held.
"""
