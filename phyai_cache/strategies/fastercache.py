"""fastercache: FasterCache's attention reuse (Lv et al. 2024), through diffusers' hooks.

Only the attention-output reuse is used; FasterCache's CFG cache is off (docs/backend-diffusers.md).
"""

from . import StrategySpec

SPEC = StrategySpec(
    name="fastercache",
    summary="reuse and extrapolate attention outputs across steps (diffusers' FasterCache)",
    fields=("active_steps",),
    backends=("diffusers",),
    not_served={"cache_dit": "cache-dit does not implement FasterCache"},
)
