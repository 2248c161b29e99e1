"""easycache: EasyCache (Zhou et al. 2025, "Less is Enough: Training-Free Video Diffusion Acceleration via
Runtime-Adaptive Caching", arXiv 2507.02860), on the native engine.

Calibration-free: on computed steps it measures the model's *transformation rate* ``k`` (how much
the output changes per unit of input change between two computed steps); on later steps it predicts
the output change from the input change alone, ``k * mean|x_t - x_(t-1)| / mean|y|``, accumulates it
over the streak, and reuses the cache while the sum stays below ``threshold`` (a relative output
change: 0.05 = 5%). Every computed step resets the sum and refreshes ``k``.

How ours differs from the paper: the input and output are the block chain's hidden input and output
(what the native engine approximates), or the transformer call's input and output with
``options.skip_call`` (as the paper's Wan/HunyuanVideo code does); ``k`` is taken between the last two
computed steps; the reused residual is kept per block list and can be forecast (``taylorseer_order``);
the step rules, caps and shared-CFG decisions are the unified ones (the paper's code lets the
conditional branch decide for both; ``separate_cfg: false`` does that here).
"""

from __future__ import annotations

from . import STEP_SCHEDULE, NativeSpec, StrategySpec, Sweep
from ._options import FORECAST_OPTIONS, boolean

SPEC = StrategySpec(
    name="easycache",
    summary="reuse while the runtime transformation-rate estimate of the output change stays below threshold",
    fields=("threshold", *STEP_SCHEDULE, "taylorseer_order"),
    defaults={"threshold": 0.05, "warmup_steps": 2},
    backends=("native",),
    not_served={"diffusers": "diffusers has no EasyCache hook (easycache: backend native)",
                "cache_dit": "cache-dit does not implement EasyCache"},
    native=NativeSpec(measured=False, statistic="easycache:EasyCacheMethod",
                      options={"skip_call": boolean, **FORECAST_OPTIONS}),
    hit_settings={"threshold": 10.0, "warmup_steps": 1},
    # An accumulated estimate of the output change (relative L1) over a streak.
    sweep=Sweep("threshold", grid=(0.1, 0.2, 0.3), quick=(0.2,), forecast=(0.2, 0.4),
                native=({"threshold": 0.1, "taylorseer_order": 1, "options": {"skip_call": True}},),
                search=({}, {"taylorseer_order": 1}, {"taylorseer_order": 1, "options": {"skip_call": True}})),
)
