"""Operator commands over a running fleet: ``extproc models …`` and ``extproc status``.

- :mod:`extproc.ops.status`: the picker's ``/status`` and drain endpoints and Envoy's admin ``/clusters``,
  behind small client interfaces, and the ``extproc status`` table.
- ``extproc models``, by layer: :mod:`extproc.ops.triton_api`, Triton's repository API (index, load,
  unload) on every host, behind a small client interface; :mod:`extproc.ops.plans`, planning (which hosts,
  in which order, what would go wrong) as pure functions; :mod:`extproc.ops.execute`, executors that drain
  a host in the picker before unloading a model from it; :mod:`extproc.ops.present`, what is printed; and
  :mod:`extproc.ops.models`, the command line glue; :mod:`extproc.ops.endpoints`, the pickers and Envoys
  that ``--picker`` and ``--envoy`` name (a URL, or every address of a DNS name).

Everything here is synchronous (a command line tool); work across hosts runs on a thread pool.
"""

from __future__ import annotations

from typing import Final

# ``extproc status`` options, here so that the command line parser needs no client code.
# The flags host_state counts per tier (a host can have several).
STATE_FLAGS: Final = ("draining", "ejected", "unhealthy", "stale")
STATE_FILTERS: Final = ("ok", "not-ok", *STATE_FLAGS, "unknown")
SORT_KEYS: Final = ("name", "state", "in-flight", "envoy", "pending", "queue", "service", "gpu", "age")


class OpsError(Exception):
    """An operation cannot go ahead (or stopped); ``str()`` is the message for the operator."""
