"""Pickers: rank candidates, best first, from their costs. The first is the pick; the rest are Envoy's
retry order."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from extproc.config import PickerName
from extproc.scheduling.scorers import Candidate, WeightedScorers, cost

# A picker: (candidates, the profile's per-request scorers, now) → the candidates to try, best first.
Picker = Callable[[Sequence[Candidate], WeightedScorers, float], list[Candidate]]


class Ranker:
    """Holds what pickers need across requests: a random source and a rotating counter."""

    def __init__(self, max_hosts: int, rng: random.Random | None = None) -> None:
        self.max_hosts = max_hosts
        self._rng = rng or random.Random()
        self._turn = 0
        self._pickers: dict[PickerName, Picker] = {
            PickerName.ARGMAX: self.argmax,
            # The scheduler draws power_of_two's sample (see Scheduler._sample); the best of it wins.
            PickerName.POWER_OF_TWO: self.argmax,
            PickerName.WEIGHTED_RANDOM: self.weighted_random,
            PickerName.ROUND_ROBIN: self.round_robin,
        }

    def picker(self, name: PickerName) -> Picker:
        """The picker called ``name``; resolved once per profile, since every request needs one. Each takes
        two or more candidates (a single candidate needs no ranking)."""
        return self._pickers[name]

    def _next_turn(self) -> int:
        self._turn += 1
        return self._turn

    def argmax(self, hosts: Sequence[Candidate], scorers: WeightedScorers, now: float) -> list[Candidate]:
        """Lowest cost first. Equal costs rotate, so ties (e.g. an idle fleet) do not herd onto one host."""
        costs = cost(hosts, scorers, now)
        n, keep = len(hosts), self.max_hosts
        i = self._next_turn() % n
        # The cheapest `keep` (at most 8) in order, from one walk over the hosts starting at this turn's host:
        # a host goes after the kept ones that cost no more than it, so ties stay in walk order and rotate.
        # The same as a stable sort of the walk, cut to `keep`, in O(n * keep) without a key call per host.
        best: list[int] = []
        for _ in range(n):
            c = costs[i]
            j = len(best)
            if j < keep or c < costs[best[j - 1]]:
                while j > 0 and costs[best[j - 1]] > c:
                    j -= 1
                best.insert(j, i)
                if len(best) > keep:
                    best.pop()
            i = i + 1 if i + 1 < n else 0
        return [hosts[b] for b in best]

    def weighted_random(self, hosts: Sequence[Candidate], scorers: WeightedScorers, now: float) -> list[Candidate]:
        """First pick at random, with weight (1 - normalised cost) + 0.05 so no candidate starves; retries
        by cost."""
        costs = cost(hosts, scorers, now)
        top = max(costs) or 1.0
        chances = [1.0 - c / top + 0.05 for c in costs]
        first = self._rng.choices(range(len(hosts)), weights=chances)[0]
        rest = sorted((i for i in range(len(hosts)) if i != first), key=costs.__getitem__)
        return [hosts[i] for i in [first, *rest][: self.max_hosts]]

    def round_robin(self, hosts: Sequence[Candidate], scorers: WeightedScorers, now: float) -> list[Candidate]:
        """Each candidate in turn, ignoring scores: the baseline the others are compared against."""
        n, start = len(hosts), self._next_turn()
        return [hosts[(start + k) % n] for k in range(min(n, self.max_hosts))]
