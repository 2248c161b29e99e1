"""The benchmark's measurements: a config timed against the uncached pipeline, and run statistics.

The benchmark (:mod:`.runner`) and the demo (:mod:`.demo`) time and score through these; the
interleaved pairs, timed calls and quality scores themselves are the library's
(:mod:`phyai_cache.tuning.measure`), which the tuner uses too.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch

from phyai_cache.api import CacheHandle
from phyai_cache.stats import RunStats
from phyai_cache.tuning.measure import PairTiming, interleaved_pairs, quality, timed_call

from .workload import Workload

__all__ = ["PairTiming", "interleaved_pairs", "quality", "summarize_runs", "time_against_uncached", "timed_call"]


def time_against_uncached(workload: Workload, plain: Any, cached: Any, handle: CacheHandle, seeds: Sequence[int],
                          on_run: Callable[[], None] | None = None) -> tuple[PairTiming, list[RunStats | None]]:
    """``cached`` (with the cache of ``handle``) against the uncached ``plain`` pipeline on ``seeds``.

    One untimed warm-up call of ``cached`` (one-time costs such as lazy init are not the cache's),
    then :func:`interleaved_pairs`, outputs read with ``workload.extract``. Returns the timing and
    the stats of every timed cached run. The cache is disabled afterwards, also on errors.
    """
    runs: list[RunStats | None] = []

    def run(pipe: Any, seed: int) -> tuple[float, torch.Tensor]:
        seconds, output = timed_call(pipe, workload.call_kwargs(seed))
        return seconds, workload.extract(output)

    def run_cached(seed: int) -> tuple[float, torch.Tensor]:
        result = run(cached, seed)
        runs.append(handle.last_run)
        return result

    try:
        run(cached, seeds[0])
        if on_run is not None:
            on_run()
        timing = interleaved_pairs(lambda seed: run(plain, seed), run_cached, seeds, on_run)
    finally:
        handle.disable()
    return timing, runs


def summarize_runs(runs: Sequence[RunStats | None]) -> dict[str, Any]:
    """Per-run means of what the cache did, and the ideal speedup from blocks, over ``runs``.

    ``ideal_speedup`` = blocks an uncached run executes / blocks the cached run executed: the
    speedup if block forwards were the only cost. None when the backend does not count blocks, or
    when it cached steps while every block still ran (it caches inside the blocks).
    """
    runs = [r for r in runs if r is not None]
    if not runs:
        return {"steps_total": None, "steps_cached": None, "blocks_total": None, "blocks_computed": None,
                "compute_fraction": None, "ideal_speedup": None, "peak_memory_bytes": None,
                "memory_kind": None, "cache_bytes": None}
    blocks_total = sum(r.blocks_total for r in runs)
    blocks_computed = sum(r.blocks_computed for r in runs)
    steps_cached = sum(r.steps_cached for r in runs)
    # Some backends cache inside the blocks (attention outputs): every block still runs, so the
    # block count says nothing about their savings and no ideal speedup can be derived from it.
    counted = blocks_total > 0 and not (steps_cached and blocks_computed == blocks_total)
    peaks = [r.peak_memory_bytes for r in runs if r.peak_memory_bytes is not None]
    return {
        "steps_total": statistics.mean(r.steps_total for r in runs),
        "steps_cached": steps_cached / len(runs),
        "blocks_total": blocks_total / len(runs),
        "blocks_computed": blocks_computed / len(runs),
        "compute_fraction": blocks_computed / blocks_total if counted else None,
        "ideal_speedup": blocks_total / blocks_computed if counted and blocks_computed else None,
        "peak_memory_bytes": max(peaks) if peaks else None,
        "memory_kind": runs[-1].memory_kind,
        "cache_bytes": max(r.cache_bytes for r in runs),
    }
