"""Which tier a request belongs to, from the fleet file's rules."""

from __future__ import annotations

from extproc.config import ModelSpec, Tier
from extproc.datapath.scheduling.types import InferenceRequest


def classify(request: InferenceRequest, spec: ModelSpec) -> Tier:
    """The tier for ``request``: an allowed client hint wins, then the first matching rule, then the model's
    default tier."""
    if spec.allow_hint and request.tier_hint is not None and request.tier_hint in spec.tiers:
        return request.tier_hint
    for rule in spec.rules:
        if rule.protocol is not None and rule.protocol != request.protocol.value:
            continue
        if rule.min_bytes is not None or rule.max_bytes is not None:
            size = request.size_bytes
            if size is None:
                continue
            if rule.min_bytes is not None and size < rule.min_bytes:
                continue
            if rule.max_bytes is not None and size > rule.max_bytes:
                continue
        return rule.tier
    return spec.default_tier
