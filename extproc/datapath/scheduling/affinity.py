"""Sequence affinity by rendezvous (highest-random-weight) hashing.

Triton keeps a sequence's state in the instance that started it, so every request of one correlation id
must reach the same host. Ranking the candidates by a hash of (model, correlation id, host) gives every
picker process and replica the same answer with no shared state, and when a host leaves the candidates
(dead, ejected, stale, model unloaded) only the sequences that were on it move.
"""

from __future__ import annotations

from collections.abc import Sequence
from hashlib import blake2b

from extproc.datapath.datastore import HostState


def rendezvous(hosts: Sequence[HostState], model: str, sequence_id: str) -> list[HostState]:
    """``hosts`` ranked for this sequence: the first is its home, the next where it would move."""
    key = f"{model}\0{sequence_id}\0".encode()

    def weight(host: HostState) -> bytes:
        return blake2b(key + host.name.encode(), digest_size=8).digest()

    return sorted(hosts, key=weight, reverse=True)
