"""The per-request path: what the picker does for each request, from Envoy's message to the answer.

- :mod:`~extproc.datapath.protocol`: the request read from Envoy's messages (path, headers, REST and gRPC
  bodies, the tensor checks) and the answer written back;
- :mod:`~extproc.datapath.scheduling`: classify → candidate hosts (filters) → scores → pick;
- :mod:`~extproc.datapath.datastore`: one record per host, which telemetry writes and the scheduler reads;
- :mod:`~extproc.datapath.batch_cost`, :mod:`~extproc.datapath.headers`, :mod:`~extproc.datapath.metrics`:
  the batch-cost model, the routing headers, the decision metrics.

This sub-package is compiled whole with mypyc where a C compiler is found; what its modules must keep to
is in docs/development.md ("The compiled modules"). The gRPC stream handlers that drive it are
:mod:`extproc.handlers`.
"""
