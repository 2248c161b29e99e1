"""Cached versus uncached on an embedded model, in detail: the quickest way to see what a config does.

``phyai-cache demo`` (:mod:`phyai_cache.cli`) prints it. Two copies of the same pipeline run the
same seed; both are warmed up, then timed in interleaved pairs whose order alternates
(:func:`.measure.interleaved_pairs`, as in the benchmark), and the speedup is the median of the
pairwise ratios. Quality is :func:`.measure.quality` (PSNR, SSIM, max and relative L1 error, digit
agreement on the reference model) of the last cached output against the last uncached one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from phyai_cache.api import enable_dit_cache
from phyai_cache.config import DiTCacheConfig
from phyai_cache.stats import RunStats

from .measure import quality, time_against_uncached, timed_call
from .runner import Progress, RunCounter
from .workload import Workload, reference_available, reference_workload, tiny_workload

MODELS = ("auto", "reference", "tiny")
SEED = 0


@dataclass
class DemoResult:
    workload: str
    config: DiTCacheConfig
    backend: str | None
    stats: RunStats | None  # of the last timed cached run
    quality: dict[str, Any]  # :func:`.measure.quality`
    plain_latency_s: float
    cached_latency_s: float
    speedup: float
    ratios: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "workload": self.workload,
            "config": self.config.to_dict(),
            "backend": self.backend,
            "stats": self.stats.to_dict() if self.stats else None,
            "quality": self.quality,
            "plain_latency_s": self.plain_latency_s,
            "cached_latency_s": self.cached_latency_s,
            "speedup": self.speedup,
        }


def demo_workload(model: str, steps: int) -> Workload:
    """``"reference"`` (the digits DiT, batch 10), ``"tiny"``, or ``"auto"``: the reference when installed."""
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    if model == "auto":
        model = "reference" if reference_available() else "tiny"
    return reference_workload(steps) if model == "reference" else tiny_workload(steps)


def run_demo(workload: Workload, config: DiTCacheConfig, repeats: int = 3,
             progress: Progress | None = None) -> DemoResult:
    """Uncached vs cached on ``workload``: ``repeats`` timed pairs, stats of the last cached run, quality.

    ``progress(runs done, runs total, "timing")`` is called after every pipeline call, warm-ups included.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    counter = RunCounter(progress, total=2 * repeats + 2, label="timing")
    plain, cached = workload.make_pipeline(), workload.make_pipeline()
    timed_call(plain, workload.call_kwargs(SEED))  # warm-up; the cached side's is in time_against_uncached
    counter.tick()
    handle = enable_dit_cache(cached, config)
    timing, runs = time_against_uncached(workload, plain, cached, handle, [SEED] * repeats, counter.tick)
    return DemoResult(
        workload=workload.name, config=config, backend=handle.backend, stats=runs[-1],
        quality=quality(timing.cached_outputs[-1], timing.plain_outputs[-1], workload.data_range,
                        workload.agreement, workload.classes),
        plain_latency_s=timing.latency_plain_s, cached_latency_s=timing.latency_cached_s,
        speedup=timing.speedup, ratios=timing.ratios,
    )
