"""pab: Pyramid Attention Broadcast (Zhao et al. 2024), through diffusers' hooks.

Attention outputs are reused across steps within diffusers' timestep ranges; blocks still run.
"""

from . import StrategySpec

SPEC = StrategySpec(
    name="pab",
    summary="reuse attention outputs across steps (diffusers' PyramidAttentionBroadcast)",
    fields=("active_steps",),
    backends=("diffusers",),
    not_served={"cache_dit": "cache-dit does not implement Pyramid Attention Broadcast"},
)
