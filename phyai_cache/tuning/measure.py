"""Timing and scoring shared by the tuner and the lab's benchmark: timed calls, interleaved pairs, quality.

Timing uses interleaved pairs (uncached, cached, cached, uncached, ...) and the median of the
pairwise ratios: on shared cores the load changes from minute to minute, and a reference timed
once, minutes away from the cached run, can be off by 30 %. Within a pair both runs see about the
same load, and the median discards the pairs a load spike hit.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .metrics import psnr, ssim, ssim_supported

TimedRun = Callable[[int], tuple[float, Any]]  # seed -> (seconds, output) of one timed call


def timed_call(pipe: Any, kwargs: Mapping[str, Any]) -> tuple[float, Any]:
    """Seconds and output of one pipeline call (no autograd, as in inference)."""
    start = time.perf_counter()
    with torch.no_grad():
        output = pipe(**kwargs)
    return time.perf_counter() - start, output


@dataclass
class PairTiming:
    """Interleaved timings and the outputs of the timed runs, one entry per seed."""

    plain_s: list[float] = field(default_factory=list)
    cached_s: list[float] = field(default_factory=list)
    plain_outputs: list[torch.Tensor] = field(default_factory=list)
    cached_outputs: list[torch.Tensor] = field(default_factory=list)

    @property
    def ratios(self) -> list[float]:
        return [p / c for p, c in zip(self.plain_s, self.cached_s) if c > 0]

    @property
    def speedup(self) -> float | None:
        return statistics.median(self.ratios) if self.ratios else None

    @property
    def latency_plain_s(self) -> float | None:
        return statistics.median(self.plain_s) if self.plain_s else None

    @property
    def latency_cached_s(self) -> float | None:
        return statistics.median(self.cached_s) if self.cached_s else None


def interleaved_pairs(run_plain: TimedRun, run_cached: TimedRun, seeds: Sequence[int],
                      on_run: Callable[[], None] | None = None) -> PairTiming:
    """For each seed: the uncached and the cached run, timed back to back.

    The order alternates (uncached first, then cached first, ...), so a load that drifts within
    pairs penalises neither side systematically.
    """
    timing = PairTiming()
    for index, seed in enumerate(seeds):
        sides = [(run_plain, timing.plain_s, timing.plain_outputs),
                 (run_cached, timing.cached_s, timing.cached_outputs)]
        for runner, times, outputs in (sides if index % 2 == 0 else sides[::-1]):
            seconds, output = runner(seed)
            times.append(seconds)
            outputs.append(output)
            if on_run is not None:
                on_run()
    return timing


def quality(cached: torch.Tensor, reference: torch.Tensor, data_range: float | None,
            agreement: Callable[[torch.Tensor], float] | None = None,
            classes: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, Any]:
    """PSNR (pooled over every image), mean SSIM, max and relative L1 error, and classifier agreement.

    ``data_range`` None means "the reference's peak-to-peak range" (latents of unknown scale).
    ``psnr_db`` is ``math.inf`` for identical outputs; ``rel_l1`` is mean|cached - reference| /
    mean|reference|. Agreement and same-class fractions are None without ``agreement``/``classes``.
    """
    span = float(reference.max() - reference.min()) if data_range is None else data_range
    span = span or 1.0
    db = psnr(cached, reference, span)  # checks the shapes
    error = (cached.double() - reference.double()).abs()
    result: dict[str, Any] = {
        "psnr_db": db,
        "ssim": ssim(cached, reference, span) if ssim_supported(cached) else None,
        "max_abs": float(error.max()),
        "rel_l1": float(error.mean() / reference.double().abs().mean().clamp_min(1e-12)),
        "agreement": None, "agreement_uncached": None, "same_class_as_uncached": None,
    }
    if agreement is not None:
        result["agreement"] = agreement(cached)
        result["agreement_uncached"] = agreement(reference)
    if classes is not None:
        result["same_class_as_uncached"] = float((classes(cached) == classes(reference)).float().mean())
    return result
