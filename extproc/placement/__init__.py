"""Demand-driven model placement (preview): the fleet loads more copies of a busy model and unloads idle
ones by itself, through the same operations as ``extproc models``.

Why a package of its own: the decision is a pure function worth testing on its own, the inputs come from
live telemetry, and the actions go through :mod:`extproc.ops`; one module each.

- :mod:`extproc.placement.plan`: the decision (desired copies per model, the loads and unloads), pure;
- :mod:`extproc.placement.inputs`: its inputs from the pickers' ``/status`` and ``/metrics``;
- :mod:`extproc.placement.footprints`: models' footprints learned from the memory change at load;
- :mod:`extproc.placement.explain`: what ``extproc placement explain`` prints;
- :mod:`extproc.placement.command`: ``extproc placement explain|run``;
- :mod:`extproc.placement.wake`: scale from zero, in the picker: a request for a managed model that no host
  has READY loads it.

The settings are the fleet file's ``placement`` section (:mod:`extproc.config.placement`).
"""

from extproc.placement.plan import Action, HostInput, ModelDecision, ModelInput, Plan, plan

__all__ = ["Action", "HostInput", "ModelDecision", "ModelInput", "Plan", "plan"]
