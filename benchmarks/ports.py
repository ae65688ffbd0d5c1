"""Free loopback ports for the stacks that the benchmarks and the tests start on demand.

Ports come from below the kernel's ephemeral range (``net.ipv4.ip_local_port_range``): a port in that range
that was free when it was chosen can be taken by any client socket's ``connect()`` before its server binds
it, which load generators, and test modules run side by side, make likely. A process never hands out the
same port twice. Under pytest-xdist each worker takes its own slice of the range (the processes a test starts
inherit it), so two workers never hand out the same port either; within a slice, processes choose at random.

Envoy's ``--base-id`` needs the same care: two Envoys on one machine with the same base id share hot-restart
sockets and shared memory, and which of them fails, or how, depends on their epochs. A port handed out here
doubles as a base id, so base ids are as distinct as ports are.
"""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path
from typing import Final

__all__ = ["envoy_base_id", "free_ports"]

# Well clear of the ports that services commonly listen on.
_LOWEST: Final = 20000
_EPHEMERAL_RANGE: Final = Path("/proc/sys/net/ipv4/ip_local_port_range")
_TRIES_PER_PORT: Final = 1000

_handed_out: set[int] = set()
# Not the random module's shared state: hypothesis seeds it, so that two processes would draw alike.
_random: Final = random.SystemRandom()


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on loopback now, none of them handed out before by this process."""
    low, high = _slice(*_range())
    found: list[int] = []
    for _ in range(count * _TRIES_PER_PORT):
        if len(found) == count:
            break
        port = _random.randrange(low, high)
        if port not in _handed_out and _bindable(port):
            _handed_out.add(port)
            found.append(port)
    if len(found) < count:
        raise RuntimeError(f"no {count} free loopback ports in {low}-{high - 1}")
    return found


def envoy_base_id() -> int:
    """An Envoy ``--base-id`` that no other Envoy these helpers start is given.

    Hot restart names its sockets ``base_id * 10 + epoch``, so distinct base ids stay apart for epochs below 10.
    """
    return free_ports(1)[0]


def _range() -> tuple[int, int]:
    """The ports below the ephemeral range (from 1024 where that range starts too low to leave room)."""
    try:
        ephemeral = int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768
    low = _LOWEST if ephemeral - _LOWEST >= 4096 else 1024
    return low, ephemeral


def _slice(low: int, high: int) -> tuple[int, int]:
    """This pytest-xdist worker's share of [low, high), or all of it outside pytest-xdist."""
    worker, workers = os.environ.get("PYTEST_XDIST_WORKER", ""), os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    if not (worker.startswith("gw") and worker[2:].isdigit() and workers.isdigit() and int(workers) > 0):
        return low, high
    index, size = int(worker[2:]), (high - low) // int(workers)
    return low + index * size, low + (index + 1) * size


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
