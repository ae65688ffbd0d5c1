"""Open sequences per host: a new sequence is refused (429) while its host's sequence slots are all taken.

Triton's sequence batcher runs a model's sequences in a fixed number of slots (the direct strategy: one
per batch row of each instance; the oldest strategy: ``max_candidate_sequences``) and keeps each until it
ends or stays idle for ``max_sequence_idle_microseconds``. A sequence that finds every slot taken waits in
Triton's backlog, without a timeout: a client that starts sequences and never ends them would make every
other client's new sequence hang until its own expire. The picker sees every start and end in the requests'
parameters, so it counts the sequences open on each host (forgetting those idle longer than Triton keeps
them) and answers a start that would wait with 429 and ``retry-after`` instead. A start is also refused
while its client (the request's client key, see :mod:`extproc.datapath.scheduling.fairness`) holds its share of the
host's slots (``picker.overload.max_sequence_share``), so that one client cannot take every slot; and a
request for a sequence open for another client is refused (403), so that no client can add to, end or
restart another's sequence.

The count is this picker process's: with ``picker.workers`` N each worker sees about 1/N of the sequences
and counts each N times; picker replicas each count their own share.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Final

from extproc.datapath.datastore import HostState
from extproc.datapath.scheduling.types import InferenceRequest, Reject

__all__ = ["OpenSequences"]

# Sequences remembered per (host, model) when the model's slots are not known: a bound on memory only.
_MAX_TRACKED: Final = 100_000


def _no_slot(message: str) -> Reject:
    return Reject(429, message, "sequence_slots", retry_after=True)


class OpenSequences:
    """The sequences this picker saw start (or continue) on each host and not end yet, per model."""

    def __init__(self, weight: int = 1, max_share: float = 1.0) -> None:
        """``weight``: how many sequences one seen here stands for (a worker sees 1/N of them);
        ``max_share``: of a host's slots for a model, the most one client may hold."""
        self._weight = weight
        self._max_share = max_share
        # (host, model) → sequence id → when its last request was routed and its client, oldest first.
        self._open: dict[tuple[str, str], OrderedDict[str, tuple[float, str]]] = {}
        # (host, model) → client → its sequences open there.
        self._held: dict[tuple[str, str], dict[str, int]] = {}
        # (model, sequence id) → the host it is open on: where a sequence that moved lived.
        self._homes: dict[tuple[str, str], str] = {}

    def admit(self, host: HostState, request: InferenceRequest, now: float) -> Reject | None:
        """Count ``request`` (of a sequence, routed to ``host``), or the answer that refuses it instead."""
        model, sequence = request.model or "", request.sequence_id or ""
        batching = host.batching.get(model)
        idle_s = batching.sequence_idle_s if batching is not None else 1.0
        slots = batching.sequence_slots if batching is not None else 0
        client = request.client or ""
        key = (host.name, model)
        table = self._open.get(key)
        if table is None:
            table = self._open[key] = OrderedDict()
            self._held[key] = {}
        held = self._held[key]
        while table:
            oldest, (at, owner) = next(iter(table.items()))
            if now - at <= idle_s:
                break
            self._remove(key, oldest, owner)
            self._homes.pop((model, oldest), None)
        entry = table.get(sequence)
        if entry is not None:
            if entry[1] != client:
                # Triton's sequence ids are one namespace per host: without this, any client could add to
                # another's sequence, end it, or restart it.
                return Reject(
                    403,
                    f"sequence {sequence[:64]} of model '{model}' is open for another client; use another sequence id",
                    "sequence_owner",
                )
            if request.sequence_end:
                self._remove(key, sequence, entry[1])
                del self._homes[model, sequence]
            else:
                table[sequence] = (now, entry[1])
                table.move_to_end(sequence)
            return None
        if not request.sequence_start:
            moved = self._moved(model, sequence, host.name)
            if moved is not None:
                return moved
        if request.sequence_start and slots:
            if len(table) * self._weight >= slots:
                return _no_slot(
                    f"all {slots} sequence slots of model '{model}' on the host of sequence {sequence[:64]} are in "
                    "use; a new sequence would wait for one"
                )
            mine = held.get(client, 0) * self._weight
            if mine + self._weight > slots * self._max_share:
                return _no_slot(
                    f"this client holds {mine} of the {slots} sequence slots of model '{model}' on the host of "
                    f"sequence {sequence[:64]}, its share; end a sequence before starting another"
                )
        if not request.sequence_end and len(table) < _MAX_TRACKED:
            self._forget(model, sequence)
            table[sequence] = (now, client)
            held[client] = held.get(client, 0) + 1
            self._homes[model, sequence] = host.name
        return None

    def _remove(self, key: tuple[str, str], sequence: str, client: str) -> None:
        del self._open[key][sequence]
        held = self._held[key]
        left = held[client] - 1
        if left:
            held[client] = left
        else:
            del held[client]

    def _moved(self, model: str, sequence: str, host: str) -> Reject | None:
        """A sequence that was open on another host (which stopped being a candidate: down, ejected,
        drained, the model unloaded) cannot go on here: its state stayed there."""
        home = self._homes.get((model, sequence))
        if home is None or home == host:
            return None
        self._forget(model, sequence)
        return Reject(
            409,
            f"sequence {sequence[:64]} of model '{model}' was running on a host that is no longer available; its "
            "state is lost: start it again (sequence_start)",
            "sequence_moved",
        )

    def _forget(self, model: str, sequence: str) -> None:
        home = self._homes.pop((model, sequence), None)
        if home is None:
            return
        key = (home, model)
        entry = self._open[key].get(sequence)
        if entry is not None:
            self._remove(key, sequence, entry[1])
