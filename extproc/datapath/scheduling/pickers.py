"""Pickers: rank candidates, best first, from their costs. The first is the pick; the rest are Envoy's
retry order."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import ClassVar

from extproc.datapath.datastore import HostState
from extproc.datapath.scheduling import registry
from extproc.datapath.scheduling.filters import Filters, passes, passing
from extproc.datapath.scheduling.registry import Context, Unit
from extproc.datapath.scheduling.scorers import Candidate, WeightedScorers, cost


class Picker(Unit):
    """Ranks a request's candidates. The context's state (turn, random source) is shared by the
    scheduler's pickers."""

    # False: the ranking ignores the costs, so a profile may weigh no scorer above 0.
    uses_scores: ClassVar[bool] = True

    def __init__(self, context: Context) -> None:
        self.context = context
        self.max_hosts = context.max_hosts

    def sample(self, hosts: tuple[HostState, ...], filters: Filters, now: float) -> list[HostState] | None:
        """The hosts to prepare as this request's candidates, drawn from ``hosts`` (those of the tier with
        the model), all passing ``filters``; or None: every host that passes, prepared once and kept until
        the datastore changes (the scheduler's plan)."""
        return None

    @abstractmethod
    def pick(
        self, candidates: Sequence[Candidate], scorers: WeightedScorers, now: float, own: float = 1.0
    ) -> list[Candidate]:
        """At most ``max_hosts`` of two or more candidates, best first (a single candidate needs no
        ranking); ``scorers`` are the profile's per-request ones (see :func:`cost`), ``own`` the request's work
        (see :meth:`~extproc.datapath.scheduling.scheduler.Scheduler.work`)."""


class Argmax(Picker):
    def pick(
        self, candidates: Sequence[Candidate], scorers: WeightedScorers, now: float, own: float = 1.0
    ) -> list[Candidate]:
        """Lowest cost first. Equal costs rotate, so ties (e.g. an idle fleet) do not herd onto one host."""
        costs = cost(candidates, scorers, now, own)
        n, keep = len(candidates), self.max_hosts
        i = self.context.next_turn() % n
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
        return [candidates[b] for b in best]


class PowerOfTwo(Argmax):
    """The lowest cost of a random sample of ``max(2, max_hosts)`` hosts (two for the choice, and enough for
    the retry list): a large tier costs no more than a small one."""

    def __init__(self, context: Context) -> None:
        super().__init__(context)
        self.sample_size = max(2, context.max_hosts)

    def sample(self, hosts: tuple[HostState, ...], filters: Filters, now: float) -> list[HostState] | None:
        """Draw hosts at random until enough pass; the first that pass are a uniform sample of those that
        pass, and no plan of every host is prepared (which a large tier would need again after each host's
        scrape). Too many failures (a mostly ejected or stale tier): filter them all and draw from those
        that pass. A tier no larger than the sample: all of it (the plan)."""
        want = self.sample_size
        n = len(hosts)
        if n <= want:
            return None
        rng = self.context.rng
        draw = rng.random
        drawn: list[HostState] = []
        tried: set[int] = set()
        for _ in range(4 * want):
            i = int(draw() * n)  # randrange(n) is 5x slower; the bias (n / 2**53) is negligible
            if i in tried:
                continue
            tried.add(i)
            if passes(hosts[i], filters, now):
                drawn.append(hosts[i])
                if len(drawn) == want:
                    return drawn
        every = passing(hosts, filters, now)
        return every if len(every) <= want else rng.sample(every, want)


class WeightedRandom(Picker):
    def pick(
        self, candidates: Sequence[Candidate], scorers: WeightedScorers, now: float, own: float = 1.0
    ) -> list[Candidate]:
        """First pick at random, with weight (1 - normalised cost) + 0.05 so no candidate starves; retries
        by cost."""
        costs = cost(candidates, scorers, now, own)
        top = max(costs) or 1.0
        chances = [1.0 - c / top + 0.05 for c in costs]
        first = self.context.rng.choices(range(len(candidates)), weights=chances)[0]
        rest = sorted((i for i in range(len(candidates)) if i != first), key=costs.__getitem__)
        return [candidates[i] for i in [first, *rest][: self.max_hosts]]


class RoundRobin(Picker):
    """Each candidate in turn, ignoring scores: the baseline the others are compared against."""

    uses_scores = False

    def pick(
        self, candidates: Sequence[Candidate], scorers: WeightedScorers, now: float, own: float = 1.0
    ) -> list[Candidate]:
        n, start = len(candidates), self.context.next_turn()
        return [candidates[(start + k) % n] for k in range(min(n, self.max_hosts))]


registry.PICKERS.register("argmax", Argmax)
registry.PICKERS.register("power_of_two", PowerOfTwo)
registry.PICKERS.register("weighted_random", WeightedRandom)
registry.PICKERS.register("round_robin", RoundRobin)
