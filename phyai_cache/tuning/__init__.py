"""Find the fastest cache config for your own pipeline that keeps a quality bar (``phyai_cache.tune``).

- :func:`tune` / :func:`tune_tiers` search each strategy's knob (bisection over thresholds and
  intervals) on calibration seeds and verify the winner on held-out seeds (:mod:`.tune`);
- :mod:`.measure` times cached against uncached calls in interleaved pairs and scores the outputs;
- :func:`psnr` and :func:`ssim` are the torch-only metrics (:mod:`.metrics`);
- :func:`extract_images` reads a diffusers pipeline's output as images (:mod:`.outputs`).

This is library code: it needs torch and your pipeline, nothing from the lab (``phyai_cache_lab``,
the benchmark on the shipped reference models and the ``phyai-cache tune`` command around it).
"""

from .metrics import psnr, ssim
from .outputs import CallKwargs, Extract, extract_images
from .tune import Measurement, TuneError, TuneResult, tune, tune_tiers

__all__ = ["CallKwargs", "Extract", "Measurement", "TuneError", "TuneResult", "extract_images", "psnr", "ssim",
           "tune", "tune_tiers"]
