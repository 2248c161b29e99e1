"""seacache: SeaCache (Spectral-Evolution-Aware Cache, CVPR 2026, arXiv 2602.18993), through diffusers' hooks.

A calibration-free, one-threshold criterion like TeaCache's, on a better indicator: the raw visual
latents are Wiener-filtered in frequency space with a gain set by the step's noise level, so the
indicator follows the content that the model is refining rather than the noise it removes. The
relative change of that indicator is accumulated; the block stack is skipped while the sum stays
below ``threshold`` and its residual is reused or extrapolated (``taylorseer_order`` 0 or 1).

phyai_cache supplies what diffusers leaves to the pipeline (the step, sigma and step count of every
call, and the latents for image models as well as video ones); see
phyai_cache/adapters/diffusers/seacache.py.
"""

from . import StrategySpec

SPEC = StrategySpec(
    name="seacache",
    summary="skip the block stack while the accumulated change of the spectrally filtered latents stays low "
            "(diffusers' SeaCache)",
    fields=("threshold", "warmup_steps", "active_steps", "max_consecutive_cached", "taylorseer_order"),
    defaults={"threshold": 0.25, "warmup_steps": 1, "max_consecutive_cached": 2, "taylorseer_order": 1},
    backends=("diffusers",),
    not_served={"native": "the native engine has no SeaCache indicator (seacache: backend diffusers)",
                "cache_dit": "cache-dit does not implement SeaCache"},
    hit_settings={"threshold": 10.0, "warmup_steps": 1},
    sweep="threshold",
)
