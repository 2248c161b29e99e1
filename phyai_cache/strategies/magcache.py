"""magcache: MagCache (Ma et al. 2025), through diffusers' hooks.

Skips steps while the accumulated error predicted by the per-step magnitude ratios of the model
stays below ``threshold``; the ratios are calibrated per model (diffusers ships Flux's).
"""

from . import StrategySpec

SPEC = StrategySpec(
    name="magcache",
    summary="skip steps while the magnitude-ratio error budget allows (diffusers' MagCache)",
    fields=("threshold", "warmup_steps", "active_steps", "max_consecutive_cached"),
    defaults={"threshold": 0.06, "warmup_steps": 2, "max_consecutive_cached": 3},
    backends=("diffusers",),
    not_served={"cache_dit": "cache-dit does not implement MagCache"},
    hit_settings={"threshold": 10.0, "warmup_steps": 1},
    sweep="threshold",
)
