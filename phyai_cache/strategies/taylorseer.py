"""taylorseer: scheduled forecasting (TaylorSeer, Liu et al. 2025).

No measurement: after warmup every ``cache_interval``-th step computes (or ``compute_mask`` says
which) and the steps between forecast the blocks' output with a Taylor expansion of order
``taylorseer_order`` over the computed steps.
"""

from . import NativeSpec, StrategySpec
from ._options import boolean, positive_number

SPEC = StrategySpec(
    name="taylorseer",
    summary="compute every N-th step (or per compute mask), Taylor-forecast the steps between",
    fields=("taylorseer_order", "cache_interval", "compute_mask", "warmup_steps", "active_steps"),
    defaults={"taylorseer_order": 1, "cache_interval": 3, "warmup_steps": 2},
    backends=("native", "diffusers"),
    not_served={"cache_dit": "cache-dit has no standalone TaylorSeer: its TaylorSeer is a calibrator on top of "
                             "DBCache (strategy 'dbcache' or 'fbcache' with taylorseer_order=k here)"},
    native=NativeSpec(measured=False, options={"verify": positive_number, "skip_call": boolean}),
    hit_settings={"warmup_steps": 1, "taylorseer_order": 1},
    sweep="interval",
)
