"""The models: which tier serves each request (tier rules) and how its hosts are chosen there (scheduling
profiles, whose units are named as :mod:`extproc.datapath.scheduling.registry` registers them)."""

from __future__ import annotations

from typing import Annotated, Any, Self

from pydantic import AfterValidator, Field, model_validator
from pydantic_core import PydanticCustomError

from extproc.config.common import PositiveMs, Strict, Tier
from extproc.datapath.scheduling import registry

__all__ = ["FilterName", "ModelSpec", "PickerName", "Profile", "ScorerName", "TierRule"]


def _registered(units: registry.Registry[Any]) -> AfterValidator:
    """Refuses a name that no unit of ``units`` is registered under (extproc/datapath/scheduling/registry.py)."""

    def check(name: str) -> str:
        names = units.names()
        if name not in names:
            quoted = [repr(n) for n in names]
            expected = f"{', '.join(quoted[:-1])} or {quoted[-1]}" if len(quoted) > 1 else "".join(quoted)
            raise PydanticCustomError("enum", "Input should be {expected}", {"expected": expected})
        return name

    return AfterValidator(check)


# The names of the scheduling units: see extproc/datapath/scheduling/{filters,scorers,pickers}.py for what each does.
FilterName = Annotated[str, _registered(registry.FILTERS)]
ScorerName = Annotated[str, _registered(registry.SCORERS)]
PickerName = Annotated[str, _registered(registry.PICKERS)]


class Profile(Strict):
    """How one model's (or tier's) candidates are filtered, scored and picked."""

    filters: tuple[FilterName, ...] = ("model_ready", "healthy", "fresh")
    scorers: dict[ScorerName, Annotated[float, Field(ge=0)]] = Field(
        default_factory=lambda: {"expected_completion": 1.0, "gpu_memory": 0.2}
    )
    picker: PickerName = "argmax"
    # When the classified tier has no candidate (or is saturated), try the model's other tiers.
    spillover: bool = True

    @model_validator(mode="after")
    def _sound(self) -> Self:
        if "model_ready" not in self.filters:
            raise ValueError("filters must include model_ready: a request must never reach a host without its model")
        if len(set(self.filters)) != len(self.filters):
            raise ValueError("filters repeat a filter")
        # (in this order: picker.py builds the default profile as the config loads, before the units can be)
        if not any(self.scorers.values()) and registry.PICKERS.unit(self.picker).uses_scores:
            raise ValueError("at least one scorer weight must be above 0")
        return self


class TierRule(Strict):
    """Send a request to ``tier`` when every condition given here holds."""

    tier: Tier
    min_bytes: int | None = Field(default=None, ge=0)
    max_bytes: int | None = Field(default=None, ge=0)
    protocol: str | None = Field(default=None, pattern=r"^(http|grpc)$")

    @model_validator(mode="after")
    def _range(self) -> Self:
        if self.min_bytes is not None and self.max_bytes is not None and self.min_bytes > self.max_bytes:
            raise ValueError(f"min_bytes ({self.min_bytes}) is above max_bytes ({self.max_bytes})")
        return self


class ModelSpec(Strict):
    name: str = Field(min_length=1, max_length=256)
    # Tiers this model may be served from; the first is its default tier.
    tiers: tuple[Tier, ...] = Field(default=(Tier.GPU,), min_length=1)
    # First matching rule wins; no match → the default tier.
    rules: tuple[TierRule, ...] = ()
    # Whether a client's tier hint header may choose among ``tiers``.
    allow_hint: bool = True
    # Overrides the picker's (and the tier's) scheduling profile for this model.
    profile: Profile | None = None
    # A sequence-batched model: Envoy streams its REST bodies to the picker, which reads the correlation id
    # from the JSON ``parameters`` (gRPC requests are read for every model).
    sequence: bool = False
    # The longest this model's inference requests may take (else picker.overload.deadline_ms); clients may
    # ask for less.
    deadline_ms: PositiveMs | None = None

    @model_validator(mode="after")
    def _rules_within_tiers(self) -> Self:
        if len(set(self.tiers)) != len(self.tiers):
            raise ValueError(f"tiers repeat a tier: {[t.value for t in self.tiers]}")
        for i, rule in enumerate(self.rules):
            if rule.tier not in self.tiers:
                raise ValueError(f"rules[{i}] sends to tier {rule.tier.value!r}, which is not in tiers")
        return self

    @property
    def default_tier(self) -> Tier:
        return self.tiers[0]
