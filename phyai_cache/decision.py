"""The one home of the per-step cache decision, shared by every engine that decides itself.

Every transformer call of a run is one step of one CFG branch, and whether it may reuse the cache
is decided by the same sequence everywhere (the native engine, diffusers' FirstBlockCache driven by
our rules, and the schedule parts of the other diffusers drivers):

1. the step rules alone force a compute (``warmup``, ``inactive``, ``mask``, ``interval``);
2. there is nothing valid to reuse (``no_cache``, ``shape_changed``);
3. with ``separate_cfg=False`` another branch already decided this step: follow it;
4. the strategy's measure (e.g. the relative L1 change of the front blocks' residual) is compared
   with the threshold (``above_threshold``); scheduled strategies have no measure and cache here;
   on a model sharded over ranks the measure is the whole tensor's (:func:`relative_l1` with a
   ``group``), so every rank reaches the same outcome (phyai_cache/distributed.py);
5. the caps (``max_cached``, ``max_consecutive``), then the strategy's verification of a step that
   would cache, if it has one (a verified forecaster: ``forecast_error``);
6. the outcome is recorded in the branch's counters and, for the leader, in the shared decisions.

:func:`decide` is that sequence. A strategy supplies only what it measures (a callable, evaluated
only when step 4 is reached), optionally a verification, and how it approximates a skipped step; it
never re-implements the order. The meaning of each rule is documented in docs/config-reference.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import DiTCacheConfig

CACHED = "cached"

CacheKey = tuple  # shapes, dtype and device the cached tensors were made for


# Sums a 1-D tensor element-wise over the ranks a model is sharded over and returns it on the host
# (phyai_cache.distributed.ParallelLayout.reducer); one collective per call.
SumOverRanks = Callable[[torch.Tensor], torch.Tensor]


def relative_l1(current: torch.Tensor, reference: torch.Tensor, group: SumOverRanks | None = None) -> float:
    """mean|current - reference| / mean|reference|, with a single host sync.

    The statistic of diffusers' FirstBlockCache and Cache-DiT's DBCache, so equal thresholds mean
    the same on every backend. Means in float32 so half-precision activations neither overflow nor
    round to zero. With ``group`` the tensors are this rank's shard and the statistic is the whole
    tensor's (:func:`relative_l1_groups`).
    """
    if group is not None:
        return relative_l1_groups(current, reference, [current.shape[0]], group)[0]
    ratio = (current - reference).abs().mean(dtype=torch.float32) / reference.abs().mean(dtype=torch.float32)
    return float(ratio.item())


def cache_key(hidden: Any, encoder: Any = None, modes: tuple = ()) -> CacheKey:
    """What cached tensors are valid for: any change of shape, dtype or device invalidates them, and
    so does a change of the call's modes (:func:`call_modes`)."""
    if not isinstance(hidden, torch.Tensor):
        return (None,)
    encoder_shape = tuple(encoder.shape) if isinstance(encoder, torch.Tensor) else None
    return (tuple(hidden.shape), hidden.dtype, hidden.device, encoder_shape, modes)


def call_modes(args: tuple | None, kwargs: dict[str, Any] | None) -> tuple:
    """The transformer call's string and boolean arguments: modes that change what the call computes
    and returns, with inputs of the same shapes (Qwen-Image 2.1's ``kv_cache_mode`` in diffusers: step 0
    ``"extract"`` prefills the text KV cache and returns the whole joint sequence, later steps
    ``"cached"`` return the image tokens only; ``return_prefix_kv=True`` in phyai's model, whose step
    0 returns each block's prefix K/V). Anything cached under one mode is not valid under another."""
    positional = tuple(a for a in args or () if isinstance(a, (str, bool)))
    return positional + tuple(sorted((k, v) for k, v in (kwargs or {}).items() if isinstance(v, (str, bool))))


# Modes of a call that makes the model store per-block state for its later calls: each block returns
# its prefix K/V (phyai's Qwen-Image 2.1, ``return_prefix_kv=True`` at step 0 of each branch) or fills
# a KV cache (diffusers' Qwen-Image 2.1, ``kv_cache_mode="extract"``). A skipped block would store
# nothing (or stale state), so such a call runs every block, whatever the rules say.
STATE_STORING_MODES = frozenset({("return_prefix_kv", True), ("kv_cache_mode", "extract")})


def stores_state(key: CacheKey) -> bool:
    """Whether a call with ``key`` stores per-block state (:data:`STATE_STORING_MODES`)."""
    modes = key[-1] if len(key) > 1 else ()
    return any(mode in STATE_STORING_MODES for mode in modes if isinstance(mode, tuple))


def cache_gap(key: CacheKey, stored_key: CacheKey | None, has_cache: bool = True) -> str | None:
    """Why there is nothing valid to reuse for inputs with ``key`` (or why the call must run every
    block: ``stores_state``), or None."""
    if key != stored_key:
        return "shape_changed" if stored_key is not None else "no_cache"
    if stores_state(key):
        return "stores_state"
    return None if has_cache else "no_cache"


@dataclass
class BranchCounters:
    """What one branch did so far in a run: the caps and the cache key need it."""

    cached_total: int = 0
    consecutive_cached: int = 0
    key: CacheKey | None = None  # input key at the last computed step

    def record(self, cached: bool, key: CacheKey | None) -> None:
        if cached:
            self.cached_total += 1
            self.consecutive_cached += 1
        else:
            self.consecutive_cached = 0
            self.key = key


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

    def limit(self, counters: BranchCounters) -> str | None:
        """Why the caps forbid caching this step, or None."""
        if self.max_cached is not None and counters.cached_total >= self.max_cached:
            return "max_cached"
        if self.max_consecutive is not None and counters.consecutive_cached >= self.max_consecutive:
            return "max_consecutive"
        return None

    def judge(self, diff: float) -> str:
        """Threshold test: cache when the measured change is below the threshold."""
        return CACHED if diff < self.threshold else "above_threshold"


@dataclass
class SharedDecisions:
    """``separate_cfg=False``: the first branch to decide a step decides it for the others.

    State is still kept per branch; only the yes/no is shared. With ``enabled=False`` (separate
    CFG) nothing is shared and every branch leads itself.
    """

    enabled: bool
    by_step: dict[int, tuple[str, bool]] = field(default_factory=dict)  # step -> (leader branch, cached)

    def leader(self, step: int, branch: str) -> tuple[str, bool] | None:
        """The (branch, cached) another branch took at ``step``, if this branch must follow it."""
        if not self.enabled:
            return None
        decision = self.by_step.get(step)
        return decision if decision is not None and decision[0] != branch else None

    def record(self, step: int, branch: str, cached: bool) -> None:
        if self.enabled:
            self.by_step[step] = (branch, cached)

    @staticmethod
    def follow_reason(leader: tuple[str, bool]) -> str:
        return CACHED if leader[1] else f"follows_{leader[0]}"


@dataclass(frozen=True)
class Decision:
    """One call's outcome: cache or compute, why, and the measured statistic if it was measured."""

    cached: bool
    reason: str
    diff: float | None = None
    followed: bool = False  # taken from another branch's decision (separate_cfg=False)

    @property
    def label(self) -> str:
        return "cached" if self.cached else "computed"

    def overruled(self, reason: str) -> Decision:
        """This decision turned into a compute for ``reason`` (e.g. the whole batch computes)."""
        return Decision(False, reason if self.cached else self.reason, self.diff, self.followed)


def decide(step: int, branch: str, rules: StepRules, counters: BranchCounters, shared: SharedDecisions,
           key: CacheKey | None, gap: str | None = None,
           measure: Callable[[], float] | None = None, commit: bool = True,
           verify: Callable[[], str | None] | None = None) -> Decision:
    """Take the decision of one step of one branch (the sequence in the module doc) and, unless
    ``commit=False``, record it (:func:`record`).

    ``gap`` is why nothing valid can be reused (see :func:`cache_gap`), ``measure`` the strategy's
    statistic (None for scheduled strategies: they cache whenever the rules allow). ``verify``, when
    given, is a last check of a step that would otherwise cache (a verified forecaster comparing its
    forecast with what the front blocks really gave): it returns why the step must compute, or None.
    It is evaluated after the caps, so it costs nothing on steps that compute anyway.
    """
    reason = rules.must_compute(step) or gap
    leader = shared.leader(step, branch)
    diff = None
    if reason is None and leader is not None:
        reason = SharedDecisions.follow_reason(leader)
    elif reason is None:
        if measure is not None:
            diff = measure()
            reason = rules.judge(diff)
        if reason in (None, CACHED):
            reason = rules.limit(counters) or (verify() if verify is not None else None) or CACHED
    # A branch whose step another branch already decided never overwrites that leader's record,
    # whether it followed it or was forced to compute by its own rules.
    decision = Decision(reason == CACHED, reason, diff, followed=leader is not None)
    if commit:
        record(decision, step, branch, counters, shared, key)
    return decision


def record(decision: Decision, step: int, branch: str, counters: BranchCounters, shared: SharedDecisions,
           key: CacheKey | None) -> None:
    """Record a decision in the branch's counters and, for a leader, in the shared decisions."""
    if not decision.followed:
        shared.record(step, branch, decision.cached)
    counters.record(decision.cached, key)


def relative_l1_groups(current: torch.Tensor, reference: torch.Tensor, sizes: list[int],
                       group: SumOverRanks | None = None) -> list[float]:
    """:func:`relative_l1` of each group of consecutive rows (``sizes`` rows each), one host sync.

    ``reference`` holds each group's own reference rows, stacked in the same order. Every row has
    the same number of elements, so a group's ratio of means is the mean of its rows' means.

    With ``group`` (the model is sharded over several ranks), each rank holds a shard of every row.
    Sums are reduced, not ratios: summed over the ranks they are the whole tensor's sums, and
    mean|a| / mean|b| over the same elements is sum|a| / sum|b| (the element counts cancel, also when
    shards differ in size). Every group's two sums travel in one tensor: one collective per call.
    """
    if group is not None:
        numerator = (current - reference).abs().flatten(1).sum(1, dtype=torch.float32)
        denominator = reference.abs().flatten(1).sum(1, dtype=torch.float32)
        sums = torch.stack([torch.stack([n.sum(), d.sum()]) for n, d in zip(numerator.split(sizes),
                                                                              denominator.split(sizes))])
        total = group(sums.flatten())  # [n0, d0, n1, d1, ...] over every rank, on the host
        return (total[0::2] / total[1::2]).tolist()
    numerator = (current - reference).abs().flatten(1).mean(1, dtype=torch.float32)
    denominator = reference.abs().flatten(1).mean(1, dtype=torch.float32)
    ratios = torch.stack([n.mean() / d.mean() for n, d in zip(numerator.split(sizes), denominator.split(sizes))])
    return ratios.tolist()


__all__ = ["CACHED", "BranchCounters", "Decision", "SharedDecisions", "StepRules", "cache_gap", "cache_key",
           "call_modes", "decide", "record", "relative_l1", "relative_l1_groups", "stores_state"]
