"""TeaCache's statistic for the native engine (strategy ``teacache``; see phyai_cache/strategies/teacache.py).

TeaCache (Liu et al. 2025) uses the *timestep-embedding-modulated input* ``m_t`` of the first block as
a cheap proxy for how much the output changes: ``x_t = mean|m_t - m_(t-1)| / mean|m_(t-1)|`` between
consecutive steps, rescaled by a polynomial ``p`` fitted per model (output change as a function of
``x``), accumulated over the streak, ``acc += |p(x_t)|``; the step reuses the cache while
``acc < threshold``, and every computed step resets ``acc``.

``m_t`` (``options.probe``): ``"modulated"`` calls the first block's adaptive norm (``norm1``, or
``norm`` for single-stream blocks) with the block's own hidden input and its ``temb`` argument, as
TeaCache's per-model code does for FLUX, HunyuanVideo and others (one extra norm and modulation
linear per step, nothing else); ``"input"`` uses the chain's hidden input itself (any model, no
timestep modulation); ``"auto"`` (default) is ``"modulated"`` where the first block has such a norm
and a ``temb`` argument, else ``"input"``. The norm must have parameters of its own (the modulation
projection from ``temb``): a parameter-free adaptive norm applies a modulation computed outside it,
which the block may first slice from its ``temb`` (Chroma's double block passes ``temb[:, :6]`` of a
``[B, 12, D]`` ``temb`` to its pruned ``norm1``), so ``"auto"`` measures the input there and
``"modulated"`` is refused at enable time (:func:`modulating_norm`).

``options.coefficients`` is ``p`` (highest degree first, ``numpy.poly1d`` order); without it ``p`` is
the identity (the raw input change). ``phyai-cache calibrate --strategy teacache`` fits it on the
user's own pipeline from (input change, output change) pairs of an uncached run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ...blocks import forward_parameters
from ...decision import Decision
from ...errors import CacheStateError, DiTCacheConfigError
from ...runtime import RunState
from .method import Method, StepInputs, relative_change

IDENTITY = (1.0, 0.0)


class TeaCacheMethod(Method):
    """The previous modulated input and the accumulated rescaled change of one branch."""

    def __init__(self, options: Mapping[str, Any], run: RunState) -> None:
        super().__init__(options, run)
        self.coefficients = tuple(options.get("coefficients") or IDENTITY)
        self.probe = options.get("probe", "auto")
        self.previous: torch.Tensor | None = None  # m at the previous step
        self.previous_output: torch.Tensor | None = None  # calibration: the previous step's chain output
        self.accumulated = 0.0
        self.candidate: float | None = None

    @classmethod
    def check_blocks(cls, options: Mapping[str, Any], first_block: torch.nn.Module | None) -> None:
        if options.get("probe") == "modulated" and modulating_norm(first_block) is None:
            block = type(first_block).__name__ if first_block is not None else "none"
            raise DiTCacheConfigError(
                "options.probe", "modulated", "'auto' or 'input' for this model",
                hint=f"the first cached block ({block}) has no adaptive norm (norm1 or norm) with a modulation "
                     "projection of its own that takes the block's temb argument (a parameter-free norm, as in "
                     "Chroma, applies a modulation sliced outside it); 'auto' measures the chain input here, or "
                     "use strategy 'magcache', 'easycache' or 'fbcache'")

    # -- the modulated input -------------------------------------------------------------------

    def modulated(self, inputs: StepInputs) -> torch.Tensor:
        if "modulated" not in inputs.cache:
            inputs.cache["modulated"] = self._probe(inputs)
        return inputs.cache["modulated"]

    def _probe(self, inputs: StepInputs) -> torch.Tensor:
        if self.probe == "input":
            return inputs.hidden
        norm, temb = _adaptive_norm(inputs)
        if norm is None:
            if self.probe == "modulated":  # the norm was checked at enable: this call passed no temb tensor
                raise CacheStateError(
                    f"teacache options.probe 'modulated' needs the first block's temb argument as a tensor; "
                    f"{type(inputs.first_block).__name__} got none. Use options.probe 'input' (or 'auto')")
            return inputs.hidden
        # The chain input is the first block's hidden input: modulate this branch's rows of it.
        output = norm(inputs.hidden, emb=inputs.rows_of(temb))
        return output[0] if isinstance(output, (tuple, list)) else output

    # -- the decision ----------------------------------------------------------------------------

    def gap(self, inputs: StepInputs) -> str | None:
        previous = self.previous
        if previous is None or previous.shape != self.modulated(inputs).shape:
            return "no_previous"
        return None

    def measure(self, inputs: StepInputs) -> float:
        change = self._change(inputs)
        rescaled = abs(_poly(self.coefficients, change))
        self.candidate = self.accumulated + rescaled
        return self.candidate

    def _change(self, inputs: StepInputs) -> float:
        if "input_change" not in inputs.call.measures:
            inputs.call.measures["input_change"] = relative_change(self.modulated(inputs), self.previous)
        return inputs.call.measures["input_change"]

    def committed(self, inputs: StepInputs, decision: Decision) -> None:
        if decision.cached:
            if self.candidate is None:  # followed another branch: its own change still accumulates
                self.candidate = self.measure(inputs) if self.gap(inputs) is None else self.accumulated
            self.accumulated = self.candidate
        else:
            self.accumulated = 0.0
            if self.calibrating and self.gap(inputs) is None:
                self._change(inputs)  # the x of the (x, y) pairs the polynomial is fitted on
        self.candidate = None
        self.previous = self.modulated(inputs)

    def computed(self, inputs: StepInputs, output: torch.Tensor) -> None:
        if not self.calibrating:
            return
        previous = self.previous_output
        if previous is not None and previous.shape == output.shape:
            inputs.call.measures["output_change"] = relative_change(output, previous)
        self.previous_output = output

    def tensors(self) -> list[torch.Tensor | None]:
        return [self.previous, self.previous_output]


def _poly(coefficients: tuple[float, ...], x: float) -> float:
    value = 0.0
    for c in coefficients:  # Horner, highest degree first (numpy.poly1d order)
        value = value * x + c
    return value


def _adaptive_norm(inputs: StepInputs) -> tuple[Any, Any]:
    norm = modulating_norm(inputs.first_block)
    temb = inputs.block_argument("temb") if norm is not None else None
    return (norm, temb) if isinstance(temb, torch.Tensor) else (None, None)


def modulating_norm(block: torch.nn.Module | None) -> torch.nn.Module | None:
    """The first block's adaptive norm that modulates with the block's own ``temb``, or None.

    The norm must own its modulation projection (have parameters): a parameter-free adaptive norm
    applies a modulation computed outside the block, which the block may slice from its ``temb``
    first (Chroma's pruned norms: its double block passes ``temb[:, :6]`` of a ``[B, 12, D]``
    ``temb``), so calling it with the whole ``temb`` would be wrong."""
    if block is None or "temb" not in _names(forward_parameters(block)):
        return None
    for name in ("norm1", "norm"):
        norm = getattr(block, name, None)
        if isinstance(norm, torch.nn.Module) and "emb" in _names(forward_parameters(norm)):
            return norm if any(True for _ in norm.parameters()) else None
    return None


def _names(parameters: list) -> set[str]:
    return {p.name for p in parameters}
