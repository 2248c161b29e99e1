"""The unified step rules, evaluated by our layer because diffusers' hooks have no such knobs.

diffusers' caches know no warmup counted per CFG branch, no ``active_steps`` window, no compute mask
and no caps. The adapter evaluates those rules itself, per transformer call, with exactly the
meaning the native engine gives them (the shared phyai_cache.schedule.StepRules), and tells the
diffusers hook to compute when a rule forbids reusing its cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...schedule import CACHED, StepRules, StreakCounters

__all__ = ["CACHED", "BranchCounters", "DiffusersRunState", "StepRules"]


@dataclass
class BranchCounters(StreakCounters):
    """What one CFG branch did so far in this run: the caps and the shape check need it."""

    key: tuple | None = None  # input shapes/dtype/device at the last computed step

    def record(self, cached: bool, key: tuple | None = None) -> None:  # type: ignore[override]
        super().record(cached)
        if not cached:
            self.key = key


@dataclass
class DiffusersRunState:
    """Per-run state of the adapter; dropped when the run ends (also when it raised)."""

    branches: dict[str, BranchCounters] = field(default_factory=dict)
    shared_decisions: dict[int, tuple[str, bool]] = field(default_factory=dict)  # separate_cfg=False
    strategy_state: Any = None  # e.g. PAB's per-branch hook states

    def counters(self, branch: str) -> BranchCounters:
        return self.branches.setdefault(branch, BranchCounters())
