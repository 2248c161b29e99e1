"""The unified step rules, shared by every engine that decides per step itself.

``warmup_steps``, ``active_steps``, ``compute_mask``, ``cache_interval``, the caps and the threshold
test mean the same on every backend (docs/config-reference.md); this module is their one
implementation. Steps are counted per run and per CFG branch.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import DiTCacheConfig

CACHED = "cached"


@dataclass
class StreakCounters:
    """How many steps one branch has cached so far in a run, in total and in a row."""

    cached_total: int = 0
    consecutive_cached: int = 0

    def record(self, cached: bool) -> None:
        if cached:
            self.cached_total += 1
            self.consecutive_cached += 1
        else:
            self.consecutive_cached = 0


class StepRules:
    """The config's step schedule and caps, evaluated for one step of one branch."""

    def __init__(self, config: DiTCacheConfig) -> None:
        self.threshold = config.threshold
        self.warmup_steps = config.warmup_steps or 0
        self.start, self.end = config.active_steps or (0, None)
        self.mask = config.compute_mask
        self.interval = config.cache_interval
        self.max_cached = config.max_cached_steps
        self.max_consecutive = config.max_consecutive_cached

    def inactive(self, step: int) -> bool:
        return step < self.start or (self.end is not None and step >= self.end)

    def must_compute(self, step: int) -> str | None:
        """Why the schedule alone forces this step to compute, or None."""
        if step < self.warmup_steps:
            return "warmup"
        if self.inactive(step):
            return "inactive"
        if self.mask is not None and (step >= len(self.mask) or self.mask[step] == 1):
            return "mask"
        if self.interval is not None and (step - max(self.warmup_steps, self.start)) % self.interval == 0:
            return "interval"
        return None

    def limit(self, counters: StreakCounters) -> str | None:
        """Why the caps forbid caching this step, or None."""
        if self.max_cached is not None and counters.cached_total >= self.max_cached:
            return "max_cached"
        if self.max_consecutive is not None and counters.consecutive_cached >= self.max_consecutive:
            return "max_consecutive"
        return None

    def judge(self, diff: float) -> str:
        """Threshold test: cache when the measured change is below the threshold."""
        return CACHED if diff < self.threshold else "above_threshold"
