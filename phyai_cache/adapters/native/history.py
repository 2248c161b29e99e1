"""What a cached step of the native engine reuses, and the per-branch state it is kept in.

The decision itself (phyai_cache/decision.py) is the same for every engine. The native engine has
two kinds of strategies (``NativeSpec.measured``):

* measured (fbcache, dbcache): the relative L1 change of the front blocks' residual (output minus
  input of the first ``front_blocks`` blocks, hidden states only) against the same residual at the
  *last computed* step of the same run and branch::

      diff = mean(|r_t - r_last|) / mean(|r_last|)        cache when diff < threshold

  Comparing against the last computed step lets drift accumulate over a streak of cached steps, so
  a streak ends by itself.
* scheduled (taylorseer): no measurement; after warmup every ``cache_interval``-th step computes
  (or the ``compute_mask`` says which) and the steps between are forecast.

What a cached step reuses is a :class:`ResidualHistory`: the last computed residual, or with a
Taylor forecaster of order k a finite-difference extrapolation from the last k+1 computed steps.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ...decision import BranchCounters
from ...stats import tensor_bytes


class ResidualHistory:
    """A cached residual over computed steps; ``predict(step)`` gives the value to reuse.

    ``order=None`` (or 0) reuses the last value. ``order=k`` keeps the value and its first k
    divided differences over computed steps (TaylorSeer) and extrapolates
    ``sum_i f_i * (step - last)^i / i!``. Half-precision factors are kept in float32: finite
    differences of nearly equal bf16 tensors would lose every significant bit.
    """

    def __init__(self, order: int | None) -> None:
        self.order = order or 0
        self.factors: list[torch.Tensor] = []
        self.last_step: int | None = None
        self.output_dtype: torch.dtype | None = None

    def update(self, step: int, value: torch.Tensor) -> None:
        if self.order == 0:
            self.factors, self.last_step = [value], step
            return
        self.output_dtype = value.dtype
        value = value.float() if value.element_size() < 4 else value
        new = [value]
        if self.factors and self.last_step is not None and step > self.last_step:
            gap = step - self.last_step
            for previous in self.factors[: self.order]:
                new.append((new[-1] - previous) / gap)
        self.factors, self.last_step = new, step

    def predict(self, step: int) -> torch.Tensor:
        value = self.factors[0]
        if len(self.factors) > 1:
            gap = step - self.last_step
            for i, factor in enumerate(self.factors[1:], start=1):
                value = value + factor * (gap**i / math.factorial(i))
        if self.output_dtype is not None and value.dtype != self.output_dtype:
            value = value.to(self.output_dtype)
        return value

    def nbytes(self) -> int:
        return tensor_bytes(*self.factors)


@dataclass
class BranchCache(BranchCounters):
    """The cached tensors and counters of one branch in one run."""

    decision_residual: torch.Tensor | None = None  # front-block residual at the last computed step
    segments: dict[int, tuple[ResidualHistory, ResidualHistory | None]] = field(default_factory=dict)
    method: Any = None  # the strategy's own statistic and state (adapters/native/method.py), if any
    front: ResidualHistory | None = None  # verified forecaster: the front residual over computed steps
    output: Any = None  # whole-call skipping: the call's output over computed steps (wholecall.CallOutput)

    def nbytes(self) -> int:
        histories = [h for pair in list(self.segments.values()) for h in pair if h is not None]  # list(): one C call
        histories += [h for h in (self.front, self.output.history if self.output else None) if h is not None]
        method = self.method.nbytes() if self.method is not None else 0
        return tensor_bytes(self.decision_residual) + sum(h.nbytes() for h in histories) + method

    def snapshot(self) -> BranchCache:
        """A copy to go back to when a transformer call fails. Cached tensors are never changed in
        place (every update assigns new ones, also in a Method), so copying the holders is enough."""
        saved = copy.copy(self)
        saved.segments = {k: (copy.copy(h), copy.copy(e)) for k, (h, e) in self.segments.items()}
        saved.front, saved.method = copy.copy(self.front), copy.copy(self.method)
        if self.output is not None:
            saved.output = dataclasses.replace(self.output, history=copy.copy(self.output.history))
        return saved

    def has_cache(self, segments: int, measured: bool) -> bool:
        """Every segment has a residual (and, when measured, there is a decision residual)."""
        return len(self.segments) >= segments and (not measured or self.decision_residual is not None)

    def record(self, cached: bool, key: tuple | None) -> None:
        if not cached and key != self.key:  # new shapes: tensors made for the old ones must go
            self.decision_residual = None
            self.segments.clear()
            self.front = self.output = None
        super().record(cached, key)
