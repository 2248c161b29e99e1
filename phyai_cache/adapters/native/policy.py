"""When may a step reuse the cache? The step schedule and the threshold test.

The decision statistic is the relative L1 change of the front blocks' residual (output minus input
of the first ``front_blocks`` blocks, hidden states only) against the same residual at the *last
computed* step of the same run and branch::

    diff = mean(|r_t - r_last|) / mean(|r_last|)        cache when diff < threshold

Comparing against the last computed step (not the previous step) lets drift accumulate over a
streak of cached steps, so a streak ends by itself. This is the statistic of diffusers'
FirstBlockCache and Cache-DiT's DBCache, so equal thresholds mean the same thing on every backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...config import DiTCacheConfig
from ...stats import tensor_bytes

CACHED = "cached"


@dataclass
class BranchCache:
    """The cached tensors and counters of one branch in one run."""

    key: tuple | None = None  # shape/dtype/device the tensors below were made for
    decision_residual: torch.Tensor | None = None  # front-block residual at the last computed step
    segment_residuals: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)
    cached_total: int = 0
    consecutive_cached: int = 0

    def nbytes(self) -> int:
        residuals = [t for pair in self.segment_residuals.values() for t in pair]
        return tensor_bytes(self.decision_residual, *residuals)

    def record(self, cached: bool) -> None:
        if cached:
            self.cached_total += 1
            self.consecutive_cached += 1
        else:
            self.consecutive_cached = 0


class StepSchedule:
    """The config's step rules: warmup, active range, per-run caps."""

    def __init__(self, config: DiTCacheConfig) -> None:
        self.threshold = config.threshold
        self.warmup_steps = config.warmup_steps or 0
        self.start, self.end = config.active_steps or (0, None)
        self.max_cached = config.max_cached_steps
        self.max_consecutive = config.max_consecutive_cached

    def gate(self, step: int, cache: BranchCache, key: tuple, segments: int) -> str | None:
        """Why this step must compute without even measuring, or None if it may cache."""
        if step < self.warmup_steps:
            return "warmup"
        if step < self.start or (self.end is not None and step >= self.end):
            return "inactive"
        if cache.decision_residual is None or len(cache.segment_residuals) < segments:
            return "no_cache"
        if key != cache.key:
            return "shape_changed"
        return None

    def limit(self, cache: BranchCache) -> str | None:
        """Why the caps forbid caching this step, or None."""
        if self.max_cached is not None and cache.cached_total >= self.max_cached:
            return "max_cached"
        if self.max_consecutive is not None and cache.consecutive_cached >= self.max_consecutive:
            return "max_consecutive"
        return None

    def judge(self, diff: float) -> str:
        return CACHED if diff < self.threshold else "above_threshold"


def relative_l1(current: torch.Tensor, reference: torch.Tensor) -> float:
    """mean|current - reference| / mean|reference|, with a single host sync."""
    # Means in float32 so half-precision activations neither overflow nor round to zero.
    ratio = (current - reference).abs().mean(dtype=torch.float32) / reference.abs().mean(dtype=torch.float32)
    return float(ratio.item())
