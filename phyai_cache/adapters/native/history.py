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
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ...decision import BranchCounters
from ...stats import tensor_bytes


@dataclass(frozen=True)
class Forecaster:
    """How a run's histories forecast: the order (``taylorseer_order``), the form and the axis.

    axis (``options.forecast_axis``): "time" is the sampler's own time, the call's timestep (or
    sigma) argument, where the call has one (integer, float32 or wider); else, and with "step", the step
    index. Flow-matching schedules space their timesteps unevenly, and what is forecast (a residual,
    a velocity) is smooth in that time, not in the step count.
    form (``options.forecast``): "taylor" is TaylorSeer's expansion (each difference divided by the
    last gap, ``sum f_i g^i / i!``); "newton" is the polynomial through the last k+1 computed points
    (exact for a polynomial of degree k on any spacing). The two are equal at order 1.
    """

    order: int = 0
    form: str = "taylor"
    axis: str = "step"  # the default, chosen by measurement (docs/benchmarks.md, "Forecasts in the sampler's time")

    @classmethod
    def of(cls, order: int | None, options: Mapping[str, Any]) -> Forecaster:
        """A run's forecaster: ``taylorseer_order`` and ``options.forecast`` / ``forecast_axis``, where
        given (the defaults above otherwise)."""
        return cls(order or 0, options.get("forecast", cls.form), options.get("forecast_axis", cls.axis))

    def history(self) -> ResidualHistory:
        return ResidualHistory(self.order, self.form)


def forecast_position(forecaster: Forecaster, time: Any, step: int) -> tuple[float, bool]:
    """Where a call lies on the forecaster's axis, and whether that is its time (else its step).

    ``time`` is the call's timestep argument for its own rows (a number or a tensor; integer
    timesteps, as UniPC gives Wan, are fine); a float tensor in half precision is not used: bf16
    keeps 8 bits, so the gap between two of 50 steps would be off by up to a fifth."""
    if forecaster.axis != "time" or forecaster.order == 0:
        return float(step), False
    if isinstance(time, torch.Tensor):
        if time.numel() == 0 or time.dtype == torch.bool or time.is_floating_point() and time.element_size() < 4:
            return float(step), False
        time = time.reshape(-1)[0].item()  # one host sync per call; measured strategies sync anyway
    if isinstance(time, (int, float)) and not isinstance(time, bool) and math.isfinite(time):
        return float(time), True
    return float(step), False


class ResidualHistory:
    """A cached residual over computed steps; ``predict(step, position)`` gives the value to reuse.

    ``order=None`` (or 0) reuses the last value. ``order=k`` keeps the value and its first k
    divided differences over the last computed points and extrapolates them (:data:`FORECASTS`).
    A point's *position* is its sampler time or its step index (:func:`forecast_position`); without
    one the step index is used. Half-precision factors are kept in float32: finite differences of
    nearly equal bf16 tensors would lose every significant bit.
    """

    def __init__(self, order: int | None, form: str = "taylor") -> None:
        self.order = order or 0
        self.form = form
        self.factors: list[torch.Tensor] = []
        self.points: list[float] = []  # the positions of the last computed values, newest first
        self.last_step: int | None = None
        self.output_dtype: torch.dtype | None = None

    def update(self, step: int, value: torch.Tensor, position: float | None = None) -> None:
        position = float(step) if position is None else position
        if self.order == 0:
            self.factors, self.last_step, self.points = [value], step, [position]
            return
        self.output_dtype = value.dtype
        value = value.float() if value.element_size() < 4 else value
        new = [value]
        if self.factors and self.last_step is not None and step > self.last_step:
            for i, previous in enumerate(self.factors[: self.order]):
                span = position - self.points[0 if self.form == "taylor" else i]
                if span == 0:  # two computed steps at one time: no slope to take from them
                    break
                new.append((new[-1] - previous) / span)
        self.factors, self.last_step = new, step
        self.points = [position, *self.points][: self.order + 1]

    def predict(self, step: int, position: float | None = None) -> torch.Tensor:
        x = float(step) if position is None else position
        value, weight = self.factors[0], 1.0
        for i, factor in enumerate(self.factors[1:], start=1):
            if self.form == "taylor":
                weight = (x - self.points[0]) ** i / math.factorial(i)
            else:  # newton: prod_{j<i} (x - x_j) over the newest computed points
                weight *= x - self.points[i - 1]
            value = value + factor * weight
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

