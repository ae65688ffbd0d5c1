"""Fair shares of a model's capacity between clients, for admission under overload.

Each model keeps, per client key, the requests admitted recently (an exponentially decayed count), and the
keys admitted within the last few time constants. A key over the model's fair share (the decayed total over
the number of recent keys) is refused while the model is contended, so one client sending four times the
rate of another cannot crowd it out: the lighter one, below its share, is always admitted.

Memory is bounded: a model remembers at most ``max_keys`` keys, and keys beyond them (a client minting new
ones) share one, so minting keys buys one share in all.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Final

__all__ = ["FairShares"]

# The share every key beyond max_keys counts against.
OVERFLOW_KEY: Final = "\0overflow"
# Time constant of the admitted counts: long enough to span a few batches of a slow model, short enough to
# follow a client that stops.
_TAU_S: Final = 2.0
# A key not admitted for this long no longer counts as a client of the model: a client that stopped must
# not hold an equal share (and shrink everyone else's) while its count decays.
_ACTIVE_S: Final = _TAU_S


class _Key:
    __slots__ = ("at", "count")

    def __init__(self, at: float) -> None:
        self.count = 0.0
        self.at = at

    def value(self, now: float) -> float:
        return self.count * math.exp((self.at - now) / _TAU_S)


class _Model:
    """One model's keys, least recently admitted first."""

    __slots__ = ("keys", "total")

    def __init__(self, now: float) -> None:
        self.keys: OrderedDict[str, _Key] = OrderedDict()
        self.total = _Key(now)

    def prune(self, now: float) -> None:
        keys = self.keys
        while keys:
            oldest = next(iter(keys.values()))
            if now - oldest.at <= _ACTIVE_S:
                return
            keys.popitem(last=False)


class FairShares:
    """Recent admissions per (model, client key)."""

    def __init__(self, max_keys: int) -> None:
        self._max_keys = max_keys
        self._models: dict[str, _Model] = {}

    def over_share(self, model: str, key: str, now: float) -> bool:
        """Whether ``key`` has had more than an equal share of ``model``'s recent admissions, among the keys
        admitted lately. A key alone, or new, is never over."""
        state = self._models.get(model)
        if state is None:
            return False
        state.prune(now)
        mine = state.keys.get(self._key(state, key))
        active = len(state.keys)
        if mine is None or active < 2:
            return False
        return mine.value(now) > state.total.value(now) / active

    def admitted(self, model: str, key: str, now: float) -> None:
        state = self._models.get(model)
        if state is None:
            state = self._models[model] = _Model(now)
        name = self._key(state, key)
        entry = state.keys.pop(name, None)
        if entry is None:
            entry = _Key(now)
        state.keys[name] = entry  # most recent last
        for counter in (entry, state.total):
            counter.count = counter.value(now) + 1.0
            counter.at = now

    def _key(self, state: _Model, key: str) -> str:
        if key in state.keys or len(state.keys) < self._max_keys:
            return key
        return OVERFLOW_KEY

    def keys(self, model: str) -> int:
        """How many keys ``model`` remembers (for tests and /status)."""
        state = self._models.get(model)
        return 0 if state is None else len(state.keys)
