"""Quality/speed benchmark of cache configs, and a tuner for the fastest config meeting a quality bar.

- :func:`run_bench` sweeps every available backend x strategy of the registry (plus the shipped
  presets) against the uncached pipeline, timing interleaved pairs, and returns a
  :class:`BenchReport`; :mod:`.report` and :mod:`.figures` write JSON, Markdown and PNGs.
- :func:`tune` searches (bisection over thresholds/intervals) for the fastest config whose PSNR
  against the uncached output meets a target, on calibration seeds, and verifies it on held-out seeds.
- :mod:`.demo` runs one config against the uncached pipeline in detail (``phyai-cache demo``).
- :func:`psnr` and :func:`ssim` are the torch-only metrics all of them use; :mod:`.measure` holds
  the shared timing (interleaved pairs, order alternating) and scoring.

The command line is ``phyai-cache bench`` / ``phyai-cache tune`` (:mod:`.cli`) and ``phyai-cache demo``.
"""

from .metrics import psnr, ssim
from .runner import BenchOptions, BenchReport, BenchRow, run_bench
from .sweep import SweepEntry, plan_sweep
from .tune import Measurement, TuneError, TuneResult, tune
from .workload import Workload, extract_images, reference_workload

__all__ = [
    "BenchOptions",
    "BenchReport",
    "BenchRow",
    "Measurement",
    "SweepEntry",
    "TuneError",
    "TuneResult",
    "Workload",
    "extract_images",
    "plan_sweep",
    "psnr",
    "reference_workload",
    "run_bench",
    "ssim",
    "tune",
]
