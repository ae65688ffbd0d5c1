"""What every section of the fleet file shares: the strict base model, the tiers and the number types."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["Port", "PositiveMs", "Strict", "Tier"]

Port = Annotated[int, Field(ge=1, le=65535)]
PositiveMs = Annotated[int, Field(gt=0, le=3_600_000)]


class Tier(StrEnum):
    CPU = "cpu"
    GPU = "gpu"


class Strict(BaseModel):
    """Unknown keys are errors: a typo in a fleet file must not be silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)
