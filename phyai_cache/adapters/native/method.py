"""A strategy's own statistic for the native engine, plugged into the one decision sequence.

fbcache and dbcache decide on the front blocks' residual, taylorseer on the step schedule alone; both
need nothing here. A strategy with a statistic of its own (MagCache's magnitude ratios, EasyCache's
transformation rate, TeaCache's modulated-input change) declares a :class:`Method` subclass in its
``NativeSpec(statistic="module:Class")``. The engine keeps one instance per run and CFG branch and:

1. asks :meth:`Method.gap` whether the method can judge this step at all (e.g. EasyCache before it
   has seen two computed steps): a reason there makes the step compute, like ``no_cache``;
2. passes :meth:`Method.measure` to :func:`phyai_cache.decision.decide` as the measure, so it is
   evaluated only when the sequence reaches it and is compared with ``threshold`` (cache iff below);
3. calls :meth:`Method.committed` with every decision, whatever its reason (warmup, caps, followed
   from another branch), so accumulators advance or reset exactly once per step;
4. calls :meth:`Method.computed` with the chain's (or, when whole calls are skipped, the call's)
   output of every computed step.

All methods decide when the block chain starts (no front block): what they measure is available
before any block runs. A method that needs only the call's hidden input
(``decides_before_call = True``) can also decide before the transformer call, so a skipped step
skips the whole call (``options.skip_call``).

A method keeps its state in attributes that it assigns anew, never changes a tensor it holds in
place: a failed transformer call puts the branch back to a shallow copy taken before the call
(``BranchCache.snapshot``).

Per-step figures a method wants reported (e.g. the magnitude ratio while calibrating) go into
``inputs.call.measures``; they end up in ``RunStats.records[i].measures``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ...blocks import forward_signature
from ...decision import Decision
from ...runtime import CallInfo, RunState
from ...stats import tensor_bytes


@dataclass
class StepInputs:
    """What a method may look at for one step of one branch.

    ``hidden`` is this branch's rows of the chain's hidden input (the first block's), or of the
    transformer call's ``hidden_states`` argument when whole calls are skipped. ``block_args`` and
    ``block_kwargs`` are the first block's arguments (whole batch), ``first_block`` that block; both
    are empty when whole calls are skipped.
    """

    call: CallInfo
    hidden: torch.Tensor
    rows: slice = field(default_factory=lambda: slice(None))
    first_block: torch.nn.Module | None = None
    block_args: tuple = ()
    block_kwargs: dict[str, Any] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)  # what a method computed for this step (once)

    @property
    def step(self) -> int:
        return self.call.step

    def block_argument(self, name: str) -> Any:
        """The first block's argument ``name`` (positional or keyword), or None."""
        if self.first_block is None:
            return None
        if name in self.block_kwargs:
            return self.block_kwargs[name]
        signature = forward_signature(type(self.first_block))
        try:
            bound = signature.bind_partial(self.first_block, *self.block_args, **self.block_kwargs)
        except (AttributeError, TypeError):  # no readable signature, or arguments it does not take
            return None
        return bound.arguments.get(name)

    def rows_of(self, tensor: Any) -> Any:
        if not isinstance(tensor, torch.Tensor) or self.rows == slice(None):
            return tensor
        return tensor[self.rows]


class Method:
    """Base class: one instance per run and CFG branch (see the module doc for the call order)."""

    decides_before_call: ClassVar[bool] = False

    def __init__(self, options: Mapping[str, Any], run: RunState) -> None:
        self.options = options
        self.run = run
        self.calibrating = bool(options.get("calibrate", False))

    @classmethod
    def prepare_options(cls, options: dict[str, Any], model_class: str | None) -> dict[str, Any]:
        """The checked options completed for this model, or a clear error at enable time when the
        method cannot run with them (e.g. no calibration data)."""
        return options

    @classmethod
    def check_blocks(cls, options: Mapping[str, Any], first_block: torch.nn.Module | None) -> None:
        """Refuse, at enable time, options the model's first cached block cannot serve."""

    @classmethod
    def check_run(cls, options: Mapping[str, Any], run: RunState) -> None:
        """Refuse a run the method cannot serve when it starts (before any transformer call)."""

    def gap(self, inputs: StepInputs) -> str | None:
        """Why this method cannot judge the step (the step then computes), or None."""
        return None

    def measure(self, inputs: StepInputs) -> float:
        """The statistic compared with ``threshold`` (cache iff below); called at most once per step."""
        raise NotImplementedError

    def committed(self, inputs: StepInputs, decision: Decision) -> None:
        """Called with every step's decision, after it was recorded."""

    def computed(self, inputs: StepInputs, output: torch.Tensor) -> None:
        """Called after a computed step with this branch's rows of the chain's (or call's) hidden output."""

    def tensors(self) -> list[torch.Tensor | None]:
        """The tensors the method holds (counted in ``RunStats.cache_bytes``)."""
        return []

    def nbytes(self) -> int:
        return tensor_bytes(*self.tensors())


def mean_abs(tensor: torch.Tensor) -> torch.Tensor:
    """mean|x| in float32 (half-precision activations neither overflow nor round to zero); no sync."""
    return tensor.abs().mean(dtype=torch.float32)


def relative_change(current: torch.Tensor, previous: torch.Tensor) -> float:
    """mean|current - previous| / mean|previous|, one host sync (TeaCache's input and output change).

    Unlike :func:`phyai_cache.decision.relative_l1` the denominator is clamped, so a zero ``previous``
    gives a large change rather than inf or nan."""
    return float((mean_abs(current - previous) / mean_abs(previous).clamp_min(1e-12)).item())


__all__ = ["Method", "StepInputs", "mean_abs", "relative_change"]
