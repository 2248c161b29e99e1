"""teacache: TeaCache (Liu et al. 2025, "Timestep Embedding Tells: It's Time to Cache for Video Diffusion
Model", CVPR 2025, arXiv 2411.19108), on the native engine.

The relative L1 change between consecutive steps of the first block's timestep-embedding-modulated
input (its adaptive norm applied with the step's ``temb``) is a cheap proxy for the output change;
a polynomial fitted per model (``options.coefficients``) rescales it into an output-change estimate,
which is accumulated over the streak; the step reuses the cache while the sum is below
``threshold`` and every computed step resets it.

How ours differs from the paper: the polynomial is fitted on the user's own pipeline by
``phyai-cache calibrate --strategy teacache`` (the paper fits once per model on 70 prompts and
hard-codes it) and defaults to the identity (the raw modulated-input change) when not given; the
modulated input is found generically (the first block's ``norm1``/``norm`` with its ``temb``
argument, ``options.probe``) instead of per-model code, falling back to the unmodulated hidden input
for blocks without one (or whose norm applies a modulation computed outside it, as Chroma's); the
reused residual is kept per block list and can be forecast (``taylorseer_order``); the step rules,
caps and shared-CFG decisions are the unified ones. Because the statistic needs the first block's
arguments, a cached step still runs the model's embeddings (no whole-call skipping).
"""

from __future__ import annotations

from typing import Any

from . import STEP_SCHEDULE, Calibration, NativeSpec, StrategySpec, Sweep
from ._options import FORECAST_OPTIONS, boolean, choice, coefficients

DEGREE = 4  # TeaCache's polynomial degree


def calibrated_options(records_by_run: list[list[Any]], degree: int = DEGREE) -> dict[str, Any]:
    """``options.coefficients``: a least-squares polynomial of the output change against the
    modulated-input change, over every (step, branch) of the calibration runs that has both. The
    degree drops when there are too few points for it."""
    import numpy as np

    x, y = [], []
    for records in records_by_run:
        for record in records:
            if "input_change" in record.measures and "output_change" in record.measures:
                x.append(record.measures["input_change"])
                y.append(record.measures["output_change"])
    if len(x) < 2:
        raise ValueError("fewer than two (input change, output change) pairs were recorded "
                         "(did the runs use options.calibrate: true, with at least three steps?)")
    degree = min(degree, len(x) - 1)
    fitted = np.polyfit(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64), degree)
    return {"coefficients": [float(f"{c:.6g}") for c in fitted]}


SPEC = StrategySpec(
    name="teacache",
    summary="reuse while the accumulated, polynomial-rescaled change of the modulated input stays below threshold",
    fields=("threshold", *STEP_SCHEDULE, "taylorseer_order"),
    defaults={"threshold": 0.1, "warmup_steps": 2},
    backends=("native",),
    not_served={"diffusers": "diffusers has no TeaCache hook (its pull request #12652 is not merged; "
                             "teacache: backend native)",
                "cache_dit": "cache-dit does not implement TeaCache"},
    native=NativeSpec(measured=False, statistic="teacache:TeaCacheMethod",
                      options={"coefficients": coefficients, "probe": choice("auto", "modulated", "input"),
                               "calibrate": boolean, **FORECAST_OPTIONS}),
    hit_settings={"threshold": 10.0, "warmup_steps": 1},
    # An accumulated estimate of the output change (relative L1) over a streak.
    sweep=Sweep("threshold", grid=(0.1, 0.2, 0.4), quick=(0.2,), forecast=(0.4,),
                search=({}, {"taylorseer_order": 1})),
    calibration=Calibration(options=("coefficients",), fit=calibrated_options),
)
