"""fbcache: First-Block Cache (the Fn=1, Bn=0 case of dbcache).

The first block always runs; when the relative L1 change of its residual against the last computed
step is below ``threshold``, the remaining blocks reuse their cached residual. Published as
"First Block Cache" (ParaAttention) and the basis of diffusers' FirstBlockCache and Cache-DiT's F1B0.
"""

from . import STEP_SCHEDULE, NativeSpec, StrategySpec, Sweep
from ._options import FORECAST_OPTIONS, STREAMS, positive_number

SPEC = StrategySpec(
    name="fbcache",
    summary="first block decides; the rest reuse their residual when its change is below threshold",
    fields=("threshold", "front_blocks", "back_blocks", *STEP_SCHEDULE, "taylorseer_order"),
    defaults={"threshold": 0.12, "front_blocks": 1, "back_blocks": 0, "warmup_steps": 2},
    fixed={"front_blocks": 1, "back_blocks": 0},
    fixed_hint="fbcache always computes exactly the first block; use strategy 'dbcache' for other "
               "front/back block counts",
    backends=("native", "cache_dit", "diffusers"),
    native=NativeSpec(measured=True, options={"verify": positive_number, "streams": STREAMS, **FORECAST_OPTIONS}),
    hit_settings={"threshold": 10.0, "warmup_steps": 1},
    # Relative L1 of the first block's residual: ~0.1 early, ~0.3 late on the reference model.
    sweep=Sweep("threshold", grid=(0.1, 0.2, 0.3), quick=(0.2,), forecast=(0.3, 0.4, 0.5), quick_forecast=(0.3,),
                native=({"threshold": 0.5, "taylorseer_order": 1, "options": {"verify": 0.12}},),
                search=({}, {"taylorseer_order": 1})),
)
