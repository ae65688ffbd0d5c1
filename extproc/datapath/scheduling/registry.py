"""The scheduling units by name: every filter, scorer and picker a profile of the fleet file may name.

A unit is a class implementing one of three small contracts, each defined with its units:
:class:`~extproc.datapath.scheduling.filters.Filter` (may this host take the request?),
:class:`~extproc.datapath.scheduling.scorers.Scorer` (a cost per candidate host) and
:class:`~extproc.datapath.scheduling.pickers.Picker` (the candidates ranked, best first). The module that defines a
unit registers it, next to its definition::

    registry.SCORERS.register("gpu_memory", GpuMemory)

The fleet file's validation (:mod:`extproc.config`) reads the names from here, so a misspelt name is refused
with its key; the scheduler builds each profile's units once, when it is made from the fleet, and calls
them per request without any look-up by name.

This module imports nothing from the rest of the package (the config imports it, and the units' modules
import the config): the units' modules are imported on the first question about names (:data:`UNITS`).
"""

from __future__ import annotations

import importlib
import random
from abc import ABC
from typing import TYPE_CHECKING, Final, Generic, TypeVar

if TYPE_CHECKING:
    from extproc.datapath.scheduling.filters import Filter
    from extproc.datapath.scheduling.pickers import Picker
    from extproc.datapath.scheduling.scorers import Scorer

# The modules that define units. A new unit goes into one of them; a new module of units is added here.
UNITS: Final = (
    "extproc.datapath.scheduling.filters",
    "extproc.datapath.scheduling.scorers",
    "extproc.datapath.scheduling.pickers",
)


class Context:
    """What a unit may be built with: the picker's settings, and the state its pickers share across
    requests (one per scheduler, so a seeded ``rng`` makes the decisions repeatable)."""

    def __init__(self, max_hosts: int, stale_after_s: float, rng: random.Random) -> None:
        self.max_hosts = max_hosts  # how many ranked hosts a picker returns (Envoy's retries)
        self.stale_after_s = stale_after_s  # how old telemetry may be before its host is stale
        self.rng = rng
        # From a random host: schedulers that decide side by side (workers, replicas) must not rotate their
        # equal choices over the hosts in step.
        self._turn = rng.randrange(1 << 30)

    def next_turn(self) -> int:
        """A counter that every call moves: pickers rotate equal choices with it."""
        self._turn += 1
        return self._turn


class Unit(ABC):  # noqa: B024 (the three contracts below it declare the abstract methods)
    """A filter, scorer or picker: built once per profile by its registered class, from the context."""

    def __init__(self, context: Context) -> None:  # noqa: B027 (for the units that need nothing from it)
        pass


U = TypeVar("U", bound=Unit)


class Registry(Generic[U]):
    """Names → the unit classes of one kind, in the order they were registered."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._units: dict[str, type[U]] = {}

    def register(self, name: str, unit: type[U]) -> None:
        if name in self._units:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._units[name] = unit

    def names(self) -> tuple[str, ...]:
        _import_units()
        return tuple(self._units)

    def unit(self, name: str) -> type[U]:
        _import_units()
        unit = self._units.get(name)
        if unit is None:
            raise KeyError(f"no {self.kind} called {name!r} (known: {', '.join(self._units)})")
        return unit

    def build(self, name: str, context: Context) -> U:
        return self.unit(name)(context)


FILTERS: Final[Registry[Filter]] = Registry("filter")
SCORERS: Final[Registry[Scorer]] = Registry("scorer")
PICKERS: Final[Registry[Picker]] = Registry("picker")


def _import_units() -> None:
    for module in UNITS:
        importlib.import_module(module)  # after the first time, a look-up in sys.modules
