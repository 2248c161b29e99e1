"""magcache: MagCache (Ma et al. 2025, "MagCache: Fast Video Generation with Magnitude-Aware Cache",
arXiv 2506.09045), on the native engine and through diffusers' hooks.

MagCache's finding is a *unified magnitude law*: the ratio ``gamma_t = ||r_t|| / ||r_(t-1)||`` of the
model's residual (output minus input of the block stack) between consecutive steps follows the same
curve for every prompt, close to 1 for most of the trajectory and falling at the end. Measured once
per model (one calibration run), it predicts the error of reusing a residual: over a streak of
skipped steps ``err = sum |1 - prod gamma|``; a step is skipped while ``err`` stays below
``threshold`` and at most ``max_consecutive_cached`` steps in a row (the paper's K).

Both backends take the ratios from ``options.mag_ratios`` (a list interpolated to the run's step count
like diffusers does, or one list per calibrated step count), written by ``phyai-cache calibrate``
(``phyai_cache.calibrate``) on the user's own pipeline; ``FluxTransformer2DModel`` falls back to the
FLUX.1-dev ratios diffusers ships. The native engine follows diffusers' arithmetic exactly, so both
take the same decisions; how ours differs from the paper: the decision is taken with the one
decision sequence (warmup / active steps / caps / shared CFG decisions like every other strategy);
the native engine reuses one residual per block list (not one for the whole stack) and can forecast
it (``taylorseer_order``) or skip the whole call on cached steps (``options.skip_call``); ratios may
be given per step count instead of interpolated.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import Calibration, NativeSpec, StrategySpec, Sweep
from ._options import FORECAST_OPTIONS, boolean, ratios


def ratios_for_steps(value: list[float] | Mapping[int, list[float]], steps: int) -> list[float]:
    """The ratios of a run with ``steps`` steps: the list calibrated for that step count if there is
    one, else the (longest) list interpolated to ``steps`` the way diffusers' MagCache does it
    (nearest neighbour, ``torch.round`` of ``i * (n - 1) / (steps - 1)``)."""
    import torch

    if isinstance(value, Mapping):
        if steps in value or str(steps) in value:
            return list(value.get(steps, value.get(str(steps))))
        value = max(value.values(), key=len)
    source = torch.tensor(list(value))
    if len(source) == steps:
        return [float(v) for v in source]
    if steps == 1:
        return [float(source[-1])]
    scale = (len(source) - 1) / (steps - 1)
    indices = torch.round(torch.arange(steps, dtype=torch.float32) * scale).long()
    return [float(v) for v in source[indices]]


def calibrated_options(records_by_run: list[list[Any]]) -> dict[str, Any]:
    """``options.mag_ratios`` from calibration runs (``RunStats.records`` of runs with
    ``options.calibrate``): the mean over runs and CFG branches of each step's ratio, one list per
    step count, keyed by the count as a string (a plain list when all runs had the same count)."""
    by_steps: dict[int, list[list[float]]] = {}
    for records in records_by_run:
        branches: dict[str, list[float]] = {}
        for record in records:
            if "mag_ratio" in record.measures:
                branches.setdefault(record.branch, []).append(record.measures["mag_ratio"])
        for series in branches.values():
            by_steps.setdefault(len(series), []).append(series)
    if not by_steps:
        raise ValueError("no magnitude ratio was recorded (did the runs use options.calibrate: true?)")
    # String keys: options must survive a YAML/JSON round trip.
    means = {str(steps): [round(sum(s[i] for s in runs) / len(runs), 5) for i in range(steps)]
             for steps, runs in sorted(by_steps.items())}
    return {"mag_ratios": next(iter(means.values())) if len(means) == 1 else means}


SPEC = StrategySpec(
    name="magcache",
    summary="skip steps while the calibrated magnitude-ratio error budget allows (MagCache)",
    fields=("threshold", "warmup_steps", "active_steps", "max_consecutive_cached", "taylorseer_order"),
    defaults={"threshold": 0.06, "warmup_steps": 2, "max_consecutive_cached": 3},
    backends=("native", "diffusers"),
    not_served={"cache_dit": "cache-dit does not implement MagCache"},
    native=NativeSpec(measured=False, statistic="magcache:MagCacheMethod",
                      options={"mag_ratios": ratios, "calibrate": boolean, "skip_call": boolean, **FORECAST_OPTIONS}),
    hit_settings={"threshold": 10.0, "warmup_steps": 1, "options": {"mag_ratios": [1.0, 1.0]}},
    # Accumulated |1 - prod gamma| with the ratios calibrated on the workload, under the default streak
    # cap 3; the native engine also skips whole calls, where the forecaster carries longer streaks.
    sweep=Sweep("threshold", grid=(0.1, 0.2, 0.4), quick=(0.2,), forecast=(0.4, 1.0),
                native=({"threshold": 1.0, "taylorseer_order": 1, "max_consecutive_cached": 4,
                         "options": {"skip_call": True}},
                        {"threshold": 3.0, "taylorseer_order": 2, "max_consecutive_cached": 8,
                         "options": {"skip_call": True}}),
                search=({}, {"taylorseer_order": 1},
                        {"taylorseer_order": 1, "max_consecutive_cached": 4, "options": {"skip_call": True}},
                        {"taylorseer_order": 2, "max_consecutive_cached": 8, "options": {"skip_call": True}})),
    calibration=Calibration(options=("mag_ratios",), fit=calibrated_options),
)
