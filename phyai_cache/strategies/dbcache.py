"""dbcache: Dual-Block Cache (Cache-DiT's DBCache, FnBn).

The first ``front_blocks`` always run and their residual decides, like fbcache; the last
``back_blocks`` always run too, on top of the approximated state, which corrects part of the
reuse error. fbcache is its Fn=1, Bn=0 case.
"""

from . import STEP_SCHEDULE, NativeSpec, StrategySpec, Sweep
from ._options import FORECAST_OPTIONS, STREAMS, positive_number

SPEC = StrategySpec(
    name="dbcache",
    summary="Fn front blocks decide, middle blocks reuse their residual, Bn back blocks always run",
    fields=("threshold", "front_blocks", "back_blocks", *STEP_SCHEDULE, "taylorseer_order"),
    defaults={"threshold": 0.12, "front_blocks": 1, "back_blocks": 1, "warmup_steps": 2},
    backends=("native", "cache_dit"),
    not_served={"diffusers": "diffusers has no dual-block cache (dbcache: backends native, cache_dit)"},
    native=NativeSpec(measured=True, options={"verify": positive_number, "streams": STREAMS, **FORECAST_OPTIONS}),
    hit_settings={"threshold": 10.0, "warmup_steps": 1, "front_blocks": 1, "back_blocks": 1},
    sweep=Sweep("threshold", grid=(0.2, 0.4), quick=(), forecast=(0.4, 0.5), quick_forecast=(0.4,),
                search=({"front_blocks": 1, "back_blocks": 1},
                        {"front_blocks": 1, "back_blocks": 1, "taylorseer_order": 1},
                        {"front_blocks": 2, "back_blocks": 0, "taylorseer_order": 1})),
)
