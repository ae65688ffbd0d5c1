"""Pickers: rank candidates, best first, from their costs. The first is the pick; the rest are Envoy's
retry order."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from extproc.config import PickerName, ScorerName
from extproc.datastore import HostState
from extproc.scheduling.scorers import cost


class Ranker:
    """Holds what pickers need across requests: a random source and a rotating counter."""

    def __init__(self, max_hosts: int, rng: random.Random | None = None) -> None:
        self.max_hosts = max_hosts
        self._rng = rng or random.Random()
        self._turn = 0
        self._pickers: dict[
            PickerName, Callable[[Sequence[HostState], dict[ScorerName, float], float, str | None], list[HostState]]
        ] = {
            PickerName.ARGMAX: self.argmax,
            PickerName.POWER_OF_TWO: self.power_of_two,
            PickerName.WEIGHTED_RANDOM: self.weighted_random,
            PickerName.ROUND_ROBIN: self.round_robin,
        }

    def rank(
        self,
        picker: PickerName,
        hosts: Sequence[HostState],
        weights: dict[ScorerName, float],
        now: float,
        model: str | None = None,
    ) -> list[HostState]:
        if len(hosts) == 1:
            return [hosts[0]]
        return self._pickers[picker](hosts, weights, now, model)

    def _next_turn(self) -> int:
        self._turn += 1
        return self._turn

    def argmax(
        self, hosts: Sequence[HostState], weights: dict[ScorerName, float], now: float, model: str | None
    ) -> list[HostState]:
        """Lowest cost first. Equal costs rotate, so ties (e.g. an idle fleet) do not herd onto one host."""
        costs = cost(hosts, weights, now, model)
        n, start = len(hosts), self._next_turn()
        order = sorted(range(n), key=lambda i: (costs[i], (i - start) % n))
        return [hosts[i] for i in order[: self.max_hosts]]

    def power_of_two(
        self, hosts: Sequence[HostState], weights: dict[ScorerName, float], now: float, model: str | None
    ) -> list[HostState]:
        """Best of a random sample of ``max(2, max_hosts)``: cost is computed for the sample only, so the
        decision costs the same for 10 hosts or 10,000, and stale scores cannot herd a burst."""
        sample = self._rng.sample(list(hosts), min(len(hosts), max(2, self.max_hosts)))
        costs = cost(sample, weights, now, model)
        order = sorted(range(len(sample)), key=costs.__getitem__)
        return [sample[i] for i in order]

    def weighted_random(
        self, hosts: Sequence[HostState], weights: dict[ScorerName, float], now: float, model: str | None
    ) -> list[HostState]:
        """First pick at random, with weight (1 - normalised cost) + 0.05 so no candidate starves; retries
        by cost."""
        costs = cost(hosts, weights, now, model)
        top = max(costs) or 1.0
        chances = [1.0 - c / top + 0.05 for c in costs]
        first = self._rng.choices(range(len(hosts)), weights=chances)[0]
        rest = sorted((i for i in range(len(hosts)) if i != first), key=costs.__getitem__)
        return [hosts[i] for i in [first, *rest][: self.max_hosts]]

    def round_robin(
        self, hosts: Sequence[HostState], weights: dict[ScorerName, float], now: float, model: str | None
    ) -> list[HostState]:
        """Each candidate in turn, ignoring scores: the baseline the others are compared against."""
        n, start = len(hosts), self._next_turn()
        return [hosts[(start + k) % n] for k in range(min(n, self.max_hosts))]
