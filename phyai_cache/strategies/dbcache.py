"""dbcache: Dual-Block Cache (Cache-DiT's DBCache, FnBn).

The first ``front_blocks`` always run and their residual decides, like fbcache; the last
``back_blocks`` always run too, on top of the approximated state, which corrects part of the
reuse error. fbcache is its Fn=1, Bn=0 case.
"""

from . import STEP_SCHEDULE, NativeSpec, StrategySpec
from ._options import STREAMS, positive_number

SPEC = StrategySpec(
    name="dbcache",
    summary="Fn front blocks decide, middle blocks reuse their residual, Bn back blocks always run",
    fields=("threshold", "front_blocks", "back_blocks", *STEP_SCHEDULE, "taylorseer_order"),
    defaults={"threshold": 0.12, "front_blocks": 1, "back_blocks": 1, "warmup_steps": 2},
    backends=("native", "cache_dit"),
    not_served={"diffusers": "diffusers has no dual-block cache (dbcache: backends native, cache_dit)"},
    native=NativeSpec(measured=True, options={"verify": positive_number, "streams": STREAMS}),
    hit_settings={"threshold": 10.0, "warmup_steps": 1, "front_blocks": 1, "back_blocks": 1},
    sweep="threshold",
)
