"""taylorseer: scheduled forecasting (TaylorSeer, Liu et al. 2025).

No measurement: after warmup every ``cache_interval``-th step computes (or ``compute_mask`` says
which) and the steps between forecast the blocks' output with a Taylor expansion of order
``taylorseer_order`` over the computed steps. ``options.schedule`` gives the steps to compute per step
count, calibrated on a model (``phyai-cache tune`` searches them): the budget goes where the forecast
would miss most, which on the reference model is worth 2-3 dB at the same number of computed steps.
"""

from . import SEARCH_SCHEDULE, NativeSpec, StrategySpec, Sweep
from ._options import FORECAST_OPTIONS, boolean, positive_number, schedules

SPEC = StrategySpec(
    name="taylorseer",
    summary="compute every N-th step (or per compute mask), Taylor-forecast the steps between",
    fields=("taylorseer_order", "cache_interval", "compute_mask", "warmup_steps", "active_steps"),
    defaults={"taylorseer_order": 1, "cache_interval": 3, "warmup_steps": 2},
    backends=("native", "diffusers"),
    not_served={"cache_dit": "cache-dit has no standalone TaylorSeer: its TaylorSeer is a calibrator on top of "
                             "DBCache (strategy 'dbcache' or 'fbcache' with taylorseer_order=k here)"},
    native=NativeSpec(measured=False, options={"verify": positive_number, "skip_call": boolean,
                                               "schedule": schedules, **FORECAST_OPTIONS}),
    hit_settings={"warmup_steps": 1, "taylorseer_order": 1},
    # The default intervals; order 2 again at a longer interval, where a higher order helps; the native
    # engine also skips whole calls, and forecasts over the sampler's time beside the step index's.
    sweep=Sweep("interval", forecast=(4,), forecast_order=2,
                native=(*({"cache_interval": n, "options": {"skip_call": True}} for n in (4, 6, 8)),
                        {"cache_interval": 8, "options": {"skip_call": True, "forecast_axis": "time"}}),
                # and which steps compute, searched per step count (options.schedule)
                search=({"taylorseer_order": 1}, {"taylorseer_order": 2},
                        {"taylorseer_order": 2, "options": {"skip_call": True}, SEARCH_SCHEDULE: True})),
)
