"""Cached versus uncached on an embedded model: the quickest way to see what a config does.

Two copies of the same pipeline are timed in interleaved pairs (uncached, cached, uncached, ...)
in one process and the speedup is the median of the pairwise ratios, so load on shared cores
affects both sides alike. Quality is measured against the uncached output of the same seed.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .api import enable_dit_cache
from .config import DiTCacheConfig
from .quality import QualityReport, compare
from .stats import RunStats


@dataclass
class Workload:
    """A pipeline factory and the call that generates one batch."""

    name: str
    make_pipeline: Callable[[], Any]
    call_kwargs: Callable[[int], dict[str, Any]]  # seed -> kwargs
    to_output: Callable[[Any], torch.Tensor]
    data_range: float | None = None


def reference_workload(steps: int, batch_size: int = 10, cfg_scale: float | None = None) -> Workload:
    from . import reference

    labels = [i % 10 for i in range(batch_size)]
    return Workload(
        name=f"reference digits DiT ({steps} steps, batch {batch_size}{', CFG' if cfg_scale else ''})",
        make_pipeline=reference.load_pipeline,
        call_kwargs=lambda seed: reference.call_kwargs(labels, num_inference_steps=steps, seed=seed,
                                                       cfg_scale=cfg_scale),
        to_output=lambda out: reference.latents_to_images(out[0]),
        data_range=1.0,
    )


def tiny_workload(steps: int) -> Workload:
    from .testing import build_tiny_pipeline

    template = build_tiny_pipeline("flux")  # only its call kwargs are used
    return Workload(
        name=f"tiny random-weight FluxPipeline ({steps} steps)",
        make_pipeline=lambda: build_tiny_pipeline("flux").pipe,
        call_kwargs=lambda seed: template.call_kwargs(num_inference_steps=steps, seed=seed),
        to_output=lambda out: out[0],
    )


@dataclass
class DemoResult:
    workload: str
    config: DiTCacheConfig
    backend: str | None
    stats: RunStats | None
    quality: QualityReport
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
            "quality": self.quality.to_dict(),
            "plain_latency_s": self.plain_latency_s,
            "cached_latency_s": self.cached_latency_s,
            "speedup": self.speedup,
        }


def run_demo(workload: Workload, config: DiTCacheConfig, repeats: int = 3,
             progress: Callable[[int, int], None] | None = None) -> DemoResult:
    """Uncached vs cached on ``workload``: stats of the cached run, quality, interleaved timing."""
    plain, cached = workload.make_pipeline(), workload.make_pipeline()
    for pipe in (plain, cached):
        pipe.set_progress_bar_config(disable=True)
    handle = enable_dit_cache(cached, config)

    def timed(pipe: Any) -> tuple[float, Any]:
        start = time.perf_counter()
        with torch.no_grad():
            output = pipe(**workload.call_kwargs(0), return_dict=False)
        return time.perf_counter() - start, output

    plain_times, cached_times, total = [], [], 2 * repeats + 2
    reference_output = cached_output = None
    for index in range(repeats + 1):  # the first pair warms up and is not timed
        plain_time, reference_output = timed(plain)
        cached_time, cached_output = timed(cached)
        if index > 0:
            plain_times.append(plain_time)
            cached_times.append(cached_time)
        if progress is not None:
            progress(2 * index + 2, total)
    ratios = [p / c for p, c in zip(plain_times, cached_times)]
    quality = compare(workload.to_output(cached_output), workload.to_output(reference_output), workload.data_range)
    stats = handle.last_run
    handle.disable()
    return DemoResult(
        workload=workload.name, config=config, backend=handle.backend, stats=stats, quality=quality,
        plain_latency_s=statistics.median(plain_times), cached_latency_s=statistics.median(cached_times),
        speedup=statistics.median(ratios), ratios=ratios,
    )


def reference_available() -> bool:
    try:
        from .reference import WEIGHTS_DIR
    except Exception:
        return False
    return any(WEIGHTS_DIR.glob("*.safetensors"))
