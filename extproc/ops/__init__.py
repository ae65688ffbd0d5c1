"""Operator commands over a running fleet: ``extproc models …`` and ``extproc status``.

- :mod:`extproc.ops.status`: the picker's ``/status`` and drain endpoints and Envoy's admin ``/clusters``,
  behind small client interfaces, and the ``extproc status`` table.
- :mod:`extproc.ops.models`: Triton's repository API (index, load, unload) on every host, behind a small
  client interface; planning (which hosts, in which order, what would go wrong) as pure functions, and
  executors that drain a host in the picker before unloading a model from it.

Everything here is synchronous (a command line tool); work across hosts runs on a thread pool.
"""

from __future__ import annotations


class OpsError(Exception):
    """An operation cannot go ahead (or stopped); ``str()`` is the message for the operator."""
